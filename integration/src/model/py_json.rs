//! The `tojson` filter as transformers defines it for chat templates: Python's `json.dumps(x,
//! ensure_ascii=False, indent=None, separators=None, sort_keys=False)`. minijinja's own `tojson`
//! writes compact JSON with HTML-escaped `<`, `>`, `&` and `'`, so a template printing its tools
//! (Qwen's `{{ tool | tojson }}`) would give the model other text than it was trained on.
//! Written by hand: no crate reproduces Python's separators and indentation (serde_json's pretty
//! printer matches only `indent` with default separators).

use std::io;

use minijinja::value::{Kwargs, Value};
use minijinja::{Error, ErrorKind};
use serde::Serialize;

/// serde_json output shaped as Python's `json.dumps` shapes it.
struct PythonFormatter {
    /// Between items (`", "`; `","` when indenting).
    item_sep: String,
    /// Between a key and its value (`": "`).
    key_sep: String,
    /// One level of indentation, when indenting.
    indent: Option<String>,
    level: usize,
    has_value: bool,
}

impl PythonFormatter {
    fn new(indent: Option<String>, separators: Option<(String, String)>) -> Self {
        let (item_sep, key_sep) = separators.unwrap_or_else(|| {
            let item = if indent.is_some() { "," } else { ", " };
            (item.to_string(), ": ".to_string())
        });
        Self { item_sep, key_sep, indent, level: 0, has_value: false }
    }

    fn newline<W: ?Sized + io::Write>(&self, w: &mut W) -> io::Result<()> {
        if let Some(indent) = &self.indent {
            w.write_all(b"\n")?;
            for _ in 0..self.level {
                w.write_all(indent.as_bytes())?;
            }
        }
        Ok(())
    }

    fn open<W: ?Sized + io::Write>(&mut self, w: &mut W, bracket: &[u8]) -> io::Result<()> {
        self.level += 1;
        self.has_value = false;
        w.write_all(bracket)
    }

    fn close<W: ?Sized + io::Write>(&mut self, w: &mut W, bracket: &[u8]) -> io::Result<()> {
        self.level -= 1;
        if self.has_value {
            self.newline(w)?;
        }
        w.write_all(bracket)
    }

    fn item<W: ?Sized + io::Write>(&mut self, w: &mut W, first: bool) -> io::Result<()> {
        if !first {
            w.write_all(self.item_sep.as_bytes())?;
        }
        self.newline(w)
    }
}

impl serde_json::ser::Formatter for PythonFormatter {
    fn begin_array<W: ?Sized + io::Write>(&mut self, w: &mut W) -> io::Result<()> {
        self.open(w, b"[")
    }

    fn end_array<W: ?Sized + io::Write>(&mut self, w: &mut W) -> io::Result<()> {
        self.close(w, b"]")
    }

    fn begin_array_value<W: ?Sized + io::Write>(&mut self, w: &mut W, first: bool) -> io::Result<()> {
        self.item(w, first)
    }

    fn end_array_value<W: ?Sized + io::Write>(&mut self, _w: &mut W) -> io::Result<()> {
        self.has_value = true;
        Ok(())
    }

    fn begin_object<W: ?Sized + io::Write>(&mut self, w: &mut W) -> io::Result<()> {
        self.open(w, b"{")
    }

    fn end_object<W: ?Sized + io::Write>(&mut self, w: &mut W) -> io::Result<()> {
        self.close(w, b"}")
    }

    fn begin_object_key<W: ?Sized + io::Write>(&mut self, w: &mut W, first: bool) -> io::Result<()> {
        self.item(w, first)
    }

    fn begin_object_value<W: ?Sized + io::Write>(&mut self, w: &mut W) -> io::Result<()> {
        w.write_all(self.key_sep.as_bytes())
    }

    fn end_object_value<W: ?Sized + io::Write>(&mut self, _w: &mut W) -> io::Result<()> {
        self.has_value = true;
        Ok(())
    }

    fn write_f64<W: ?Sized + io::Write>(&mut self, w: &mut W, value: f64) -> io::Result<()> {
        w.write_all(python_float(value).as_bytes())
    }

    fn write_f32<W: ?Sized + io::Write>(&mut self, w: &mut W, value: f32) -> io::Result<()> {
        self.write_f64(w, f64::from(value))
    }
}

/// A float as Python's `repr` writes it: the shortest digits that read back, positional from
/// 1e-4 up to 1e16 (with `.0` when whole), else `d.ddde+XX` with at least two exponent digits.
fn python_float(v: f64) -> String {
    if !v.is_finite() {
        // json.dumps writes these (not JSON) by default.
        return if v.is_nan() {
            "NaN".into()
        } else if v > 0.0 {
            "Infinity".into()
        } else {
            "-Infinity".into()
        };
    }
    let sci = format!("{v:e}");
    let (mantissa, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    if (-4..16).contains(&exp) {
        let positional = format!("{v}");
        if positional.contains('.') {
            positional
        } else {
            format!("{positional}.0")
        }
    } else {
        let sign = if exp < 0 { '-' } else { '+' };
        format!("{mantissa}e{sign}{:02}", exp.abs())
    }
}

fn invalid(msg: String) -> Error {
    Error::new(ErrorKind::InvalidOperation, msg)
}

/// `value | tojson(ensure_ascii=False, indent=None, separators=None, sort_keys=False)`.
pub fn tojson(value: &Value, kwargs: Kwargs) -> Result<Value, Error> {
    let ensure_ascii: Option<bool> = kwargs.get("ensure_ascii")?;
    let indent: Option<Value> = kwargs.get("indent")?;
    let separators: Option<Vec<String>> = kwargs.get("separators")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    kwargs.assert_all_used()?;
    // Python: an integer indents by that many spaces, a string by itself; None (or absent) is compact.
    let indent = match indent {
        None => None,
        Some(v) if v.is_none() || v.is_undefined() => None,
        Some(v) => match (v.as_str(), i64::try_from(v.clone())) {
            (Some(s), _) => Some(s.to_string()),
            (None, Ok(n)) => Some(" ".repeat(n.max(0) as usize)),
            _ => return Err(invalid(format!("tojson: `indent` must be an integer or a string, got {v}"))),
        },
    };
    let separators = match separators.as_deref() {
        None => None,
        Some([item, key]) => Some((item.clone(), key.clone())),
        Some(other) => return Err(invalid(format!("tojson: `separators` must be two strings, got {}", other.len()))),
    };
    let mut out = Vec::new();
    let mut ser = serde_json::Serializer::with_formatter(&mut out, PythonFormatter::new(indent, separators));
    let written = if sort_keys.unwrap_or(false) {
        serde_json::to_value(value).and_then(|mut v| {
            v.sort_all_objects();
            v.serialize(&mut ser)
        })
    } else {
        value.serialize(&mut ser)
    };
    written.map_err(|e| invalid(format!("tojson: cannot write {value} as JSON: {e}")))?;
    let text = String::from_utf8(out).map_err(|e| invalid(format!("tojson: {e}")))?;
    let text = if ensure_ascii.unwrap_or(false) { escape_non_ascii(&text) } else { text };
    Ok(Value::from_safe_string(text))
}

/// Python's `ensure_ascii`: every character outside printable ASCII (non-ASCII, and DEL) as
/// `\uXXXX` (UTF-16 units, lowercase hex). They only occur inside JSON strings (serde_json has
/// escaped the other control characters), so this is safe on the whole text.
fn escape_non_ascii(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if c.is_ascii() && c != '\x7f' {
            out.push(c);
        } else {
            for unit in c.encode_utf16(&mut [0; 2]) {
                out.push_str(&format!("\\u{unit:04x}"));
            }
        }
    }
    out
}
