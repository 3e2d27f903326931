//! Built-in policies.

pub mod budget;
pub mod dms;
pub mod full;
pub mod shadow;
pub mod sliding_window;

pub use budget::BudgetPolicy;
pub use dms::{random_flag_unit, DmsPolicy};
pub use full::FullPolicy;
pub use shadow::ShadowPolicy;
pub use sliding_window::SlidingWindowPolicy;

use crate::{CacheShape, RowRef};

/// Per-row state of a sequence, indexed by [`CacheShape::index`].
#[derive(Debug, Clone)]
pub(crate) struct Rows<T> {
    shape: CacheShape,
    rows: Vec<T>,
}

impl<T> Rows<T> {
    pub(crate) fn new(shape: CacheShape, make: impl FnMut() -> T) -> Self {
        let mut make = make;
        Self { shape, rows: (0..shape.n_rows()).map(|_| make()).collect() }
    }

    pub(crate) fn get(&self, row: RowRef) -> Option<&T> {
        self.valid(row).then(|| &self.rows[self.shape.index(row)])
    }

    pub(crate) fn get_mut(&mut self, row: RowRef) -> Option<&mut T> {
        let i = self.shape.index(row);
        self.valid(row).then(move || &mut self.rows[i])
    }

    fn valid(&self, row: RowRef) -> bool {
        row.layer < self.shape.n_layers && row.head < self.shape.rows_per_layer
    }
}
