//! The Nanonis TCP wire format (DESIGN.md §10), written from the protocol description.
//!
//! All numbers are big-endian.
//!
//! - **Request**: the command name NUL-padded to 32 bytes, the body size (`i32`), the
//!   send-response flag (`u16`, always 1), two zero bytes, then the body (the arguments).
//! - **Reply**: the command name NUL-padded to 32 bytes, the body size (`i32`), four zero
//!   bytes, then the body: the return values followed by the error block (`u32` status, 0 = ok;
//!   `i32` message length; the message bytes).
//! - **Types**: `i32`, `u32`, `u16`, `f32`, `f64`; a string is its `i32` byte length and the
//!   bytes; a 1-D array is its `i32` element count and the elements; a 2-D `f32` array is `i32`
//!   rows, `i32` columns and the values row-major; an array of strings is its `i32` count and
//!   the strings.
//!
//! Decoding never panics and never allocates more than the input holds: every length read from
//! the wire is checked against the bytes that remain before anything is allocated.

use ndarray::Array2;
use std::fmt;

/// Length of the command-name field of a header, bytes.
pub const NAME_LEN: usize = 32;
/// Length of a request or reply header, bytes.
pub const HEADER_LEN: usize = 40;

/// Widens an `f32` from the wire to the `f64` of its shortest decimal form (the fewest digits
/// that round to the same `f32`): `0.05f32` becomes `0.05`, not `0.05000000074505806`. Values a
/// person or a config writes (0.05 s per line, 4.8 nm, a 0.2 s pulse, 20 mV) then arrive
/// exactly; any other value moves by less than half an `f32` step, as with a plain widening.
///
/// ```
/// use scopegym_drivers::nanonis::codec::widen;
/// assert_eq!(widen(0.05f32), 0.05);
/// assert_eq!(widen(4.8e-9f32), 4.8e-9);
/// assert_eq!(widen(0.5f32), 0.5);
/// ```
pub fn widen(x: f32) -> f64 {
    if !x.is_finite() {
        return f64::from(x);
    }
    format!("{x:e}").parse().unwrap_or(f64::from(x))
}

/// A malformed message or value: what was being decoded and what was wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WireError(pub String);

impl fmt::Display for WireError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for WireError {}

fn err<T>(what: impl Into<String>) -> Result<T, WireError> {
    Err(WireError(what.into()))
}

/// The type of one wire value, for decoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ty {
    /// `i32`.
    I32,
    /// `u32`.
    U32,
    /// `u16`.
    U16,
    /// `f32`.
    F32,
    /// `f64`.
    F64,
    /// A string: `i32` byte length, bytes.
    Str,
    /// A 1-D `i32` array: `i32` count, elements.
    ArrI32,
    /// A 1-D `f32` array: `i32` count, elements.
    ArrF32,
    /// A 1-D `f64` array: `i32` count, elements.
    ArrF64,
    /// An array of strings: `i32` count, strings.
    ArrStr,
    /// A 2-D `f32` array: `i32` rows, `i32` columns, values row-major.
    Arr2F32,
}

/// One wire value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// `i32`.
    I32(i32),
    /// `u32`.
    U32(u32),
    /// `u16`.
    U16(u16),
    /// `f32`.
    F32(f32),
    /// `f64`.
    F64(f64),
    /// A string (UTF-8 on our side; invalid bytes from the wire are replaced).
    Str(String),
    /// A 1-D `i32` array.
    ArrI32(Vec<i32>),
    /// A 1-D `f32` array.
    ArrF32(Vec<f32>),
    /// A 1-D `f64` array.
    ArrF64(Vec<f64>),
    /// An array of strings.
    ArrStr(Vec<String>),
    /// A 2-D `f32` array (rows × columns).
    Arr2F32(Array2<f32>),
}

impl Value {
    /// The type of this value.
    pub fn ty(&self) -> Ty {
        match self {
            Self::I32(_) => Ty::I32,
            Self::U32(_) => Ty::U32,
            Self::U16(_) => Ty::U16,
            Self::F32(_) => Ty::F32,
            Self::F64(_) => Ty::F64,
            Self::Str(_) => Ty::Str,
            Self::ArrI32(_) => Ty::ArrI32,
            Self::ArrF32(_) => Ty::ArrF32,
            Self::ArrF64(_) => Ty::ArrF64,
            Self::ArrStr(_) => Ty::ArrStr,
            Self::Arr2F32(_) => Ty::Arr2F32,
        }
    }
}

fn put_len(n: usize, what: &str, out: &mut Vec<u8>) -> Result<(), WireError> {
    let n = i32::try_from(n).map_err(|_| WireError(format!("{what}: {n} does not fit an i32")))?;
    out.extend_from_slice(&n.to_be_bytes());
    Ok(())
}

fn put_str(s: &str, out: &mut Vec<u8>) -> Result<(), WireError> {
    put_len(s.len(), "string length", out)?;
    out.extend_from_slice(s.as_bytes());
    Ok(())
}

/// Appends `v` to `out` in wire format. Fails only for a length beyond `i32`.
pub fn encode_value(v: &Value, out: &mut Vec<u8>) -> Result<(), WireError> {
    match v {
        Value::I32(x) => out.extend_from_slice(&x.to_be_bytes()),
        Value::U32(x) => out.extend_from_slice(&x.to_be_bytes()),
        Value::U16(x) => out.extend_from_slice(&x.to_be_bytes()),
        Value::F32(x) => out.extend_from_slice(&x.to_be_bytes()),
        Value::F64(x) => out.extend_from_slice(&x.to_be_bytes()),
        Value::Str(s) => put_str(s, out)?,
        Value::ArrI32(a) => {
            put_len(a.len(), "array count", out)?;
            a.iter()
                .for_each(|x| out.extend_from_slice(&x.to_be_bytes()));
        }
        Value::ArrF32(a) => {
            put_len(a.len(), "array count", out)?;
            a.iter()
                .for_each(|x| out.extend_from_slice(&x.to_be_bytes()));
        }
        Value::ArrF64(a) => {
            put_len(a.len(), "array count", out)?;
            a.iter()
                .for_each(|x| out.extend_from_slice(&x.to_be_bytes()));
        }
        Value::ArrStr(a) => {
            put_len(a.len(), "array count", out)?;
            for s in a {
                put_str(s, out)?;
            }
        }
        Value::Arr2F32(a) => {
            let (r, c) = a.dim();
            put_len(r, "2-D rows", out)?;
            put_len(c, "2-D columns", out)?;
            a.iter()
                .for_each(|x| out.extend_from_slice(&x.to_be_bytes()));
        }
    }
    Ok(())
}

/// Encodes `values` one after the other.
pub fn encode_values(values: &[Value]) -> Result<Vec<u8>, WireError> {
    let mut out = Vec::new();
    for v in values {
        encode_value(v, &mut out)?;
    }
    Ok(out)
}

/// A cursor over a received body; every read is bounds-checked.
#[derive(Debug, Clone)]
pub struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    /// A reader at the start of `buf`.
    pub fn new(buf: &'a [u8]) -> Self {
        Self { buf, pos: 0 }
    }

    /// Bytes not read yet.
    pub fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    /// Bytes read so far.
    pub fn position(&self) -> usize {
        self.pos
    }

    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], WireError> {
        if n > self.remaining() {
            return err(format!(
                "{what}: needs {n} bytes at offset {}, only {} left",
                self.pos,
                self.remaining()
            ));
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn fixed<const N: usize>(&mut self, what: &str) -> Result<[u8; N], WireError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N, what)?);
        Ok(a)
    }

    /// Reads an `i32`.
    pub fn i32(&mut self) -> Result<i32, WireError> {
        Ok(i32::from_be_bytes(self.fixed("i32")?))
    }

    /// Reads a `u32`.
    pub fn u32(&mut self) -> Result<u32, WireError> {
        Ok(u32::from_be_bytes(self.fixed("u32")?))
    }

    /// Reads a `u16`.
    pub fn u16(&mut self) -> Result<u16, WireError> {
        Ok(u16::from_be_bytes(self.fixed("u16")?))
    }

    /// Reads an `f32`.
    pub fn f32(&mut self) -> Result<f32, WireError> {
        Ok(f32::from_be_bytes(self.fixed("f32")?))
    }

    /// Reads an `f64`.
    pub fn f64(&mut self) -> Result<f64, WireError> {
        Ok(f64::from_be_bytes(self.fixed("f64")?))
    }

    /// Reads an `i32` count of items of `item` bytes each (at least 1 for the check), and
    /// checks that the body still holds that many.
    fn count(&mut self, item: usize, what: &str) -> Result<usize, WireError> {
        let n = self.i32()?;
        let Ok(n) = usize::try_from(n) else {
            return err(format!("{what}: negative count {n}"));
        };
        if n.saturating_mul(item.max(1)) > self.remaining() {
            return err(format!(
                "{what}: count {n} needs at least {} bytes, only {} left",
                n.saturating_mul(item.max(1)),
                self.remaining()
            ));
        }
        Ok(n)
    }

    /// Reads a string.
    pub fn str(&mut self) -> Result<String, WireError> {
        let n = self.count(1, "string")?;
        Ok(String::from_utf8_lossy(self.take(n, "string")?).into_owned())
    }

    /// Reads one value of type `ty`.
    pub fn value(&mut self, ty: Ty) -> Result<Value, WireError> {
        Ok(match ty {
            Ty::I32 => Value::I32(self.i32()?),
            Ty::U32 => Value::U32(self.u32()?),
            Ty::U16 => Value::U16(self.u16()?),
            Ty::F32 => Value::F32(self.f32()?),
            Ty::F64 => Value::F64(self.f64()?),
            Ty::Str => Value::Str(self.str()?),
            Ty::ArrI32 => {
                let n = self.count(4, "i32 array")?;
                Value::ArrI32((0..n).map(|_| self.i32()).collect::<Result<_, _>>()?)
            }
            Ty::ArrF32 => {
                let n = self.count(4, "f32 array")?;
                Value::ArrF32((0..n).map(|_| self.f32()).collect::<Result<_, _>>()?)
            }
            Ty::ArrF64 => {
                let n = self.count(8, "f64 array")?;
                Value::ArrF64((0..n).map(|_| self.f64()).collect::<Result<_, _>>()?)
            }
            Ty::ArrStr => {
                let n = self.count(4, "string array")?;
                Value::ArrStr((0..n).map(|_| self.str()).collect::<Result<_, _>>()?)
            }
            Ty::Arr2F32 => {
                let r = self.i32()?;
                let c = self.i32()?;
                let (Ok(ru), Ok(cu)) = (usize::try_from(r), usize::try_from(c)) else {
                    return err(format!("2-D f32 array: negative shape {r}×{c}"));
                };
                let n = ru
                    .checked_mul(cu)
                    .filter(|n| n.saturating_mul(4) <= self.remaining());
                let Some(n) = n else {
                    return err(format!(
                        "2-D f32 array: {r}×{c} values do not fit the {} bytes left",
                        self.remaining()
                    ));
                };
                let data = (0..n).map(|_| self.f32()).collect::<Result<Vec<_>, _>>()?;
                Value::Arr2F32(
                    Array2::from_shape_vec((ru, cu), data)
                        .map_err(|e| WireError(format!("2-D f32 array: {e}")))?,
                )
            }
        })
    }

    /// Reads values of the given types in order.
    pub fn values(&mut self, types: &[Ty]) -> Result<Vec<Value>, WireError> {
        types.iter().map(|&t| self.value(t)).collect()
    }
}

/// Decodes exactly `types` from `body`; bytes left over are an error.
pub fn decode_values(body: &[u8], types: &[Ty]) -> Result<Vec<Value>, WireError> {
    let mut r = Reader::new(body);
    let v = r.values(types)?;
    if r.remaining() != 0 {
        return err(format!("{} bytes left after the arguments", r.remaining()));
    }
    Ok(v)
}

/// The error block that ends every reply body.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ErrorBlock {
    /// 0 = ok; anything else is an error.
    pub status: u32,
    /// The error message (empty when ok).
    pub message: String,
}

impl ErrorBlock {
    /// The ok block (status 0, no message).
    pub fn ok() -> Self {
        Self::default()
    }

    /// Whether the status is 0.
    pub fn is_ok(&self) -> bool {
        self.status == 0
    }

    /// Appends the block to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) -> Result<(), WireError> {
        out.extend_from_slice(&self.status.to_be_bytes());
        put_str(&self.message, out)
    }

    /// Reads a block.
    pub fn decode(r: &mut Reader<'_>) -> Result<Self, WireError> {
        let status = r.u32()?;
        let message = r.str()?;
        Ok(Self { status, message })
    }
}

fn put_name(name: &str, out: &mut Vec<u8>) -> Result<(), WireError> {
    if name.len() > NAME_LEN || name.is_empty() || name.bytes().any(|b| b == 0) {
        return err(format!(
            "command name {name:?} must be 1..=32 bytes without NUL"
        ));
    }
    out.extend_from_slice(name.as_bytes());
    out.resize(out.len() + NAME_LEN - name.len(), 0);
    Ok(())
}

fn get_name(h: &[u8; HEADER_LEN]) -> Result<String, WireError> {
    let raw = &h[..NAME_LEN];
    let end = raw.iter().position(|&b| b == 0).unwrap_or(NAME_LEN);
    if end == 0 || raw[end..].iter().any(|&b| b != 0) {
        return err(format!("garbage command name field {raw:02x?}"));
    }
    let name = &raw[..end];
    if !name.iter().all(|b| b.is_ascii_graphic()) {
        return err(format!("garbage command name field {raw:02x?}"));
    }
    Ok(String::from_utf8_lossy(name).into_owned())
}

fn body_size(h: &[u8; HEADER_LEN]) -> Result<usize, WireError> {
    let n = i32::from_be_bytes([h[32], h[33], h[34], h[35]]);
    usize::try_from(n).or_else(|_| err(format!("negative body size {n}")))
}

/// A decoded request header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestHeader {
    /// The command name.
    pub name: String,
    /// Body size, bytes.
    pub body_size: usize,
    /// Whether the client asks for a reply (the send-response flag).
    pub send_response: bool,
}

/// A whole request: header and body.
pub fn encode_request(name: &str, body: &[u8]) -> Result<Vec<u8>, WireError> {
    let mut out = Vec::with_capacity(HEADER_LEN + body.len());
    put_name(name, &mut out)?;
    put_len(body.len(), "body size", &mut out)?;
    out.extend_from_slice(&1u16.to_be_bytes());
    out.extend_from_slice(&0u16.to_be_bytes());
    out.extend_from_slice(body);
    Ok(out)
}

/// Decodes a request header.
pub fn decode_request_header(h: &[u8; HEADER_LEN]) -> Result<RequestHeader, WireError> {
    let name = get_name(h)?;
    let body_size = body_size(h)?;
    let flag = u16::from_be_bytes([h[36], h[37]]);
    if flag > 1 || h[38..40] != [0, 0] {
        return err(format!("bad request header flags {:02x?}", &h[36..40]));
    }
    Ok(RequestHeader {
        name,
        body_size,
        send_response: flag == 1,
    })
}

/// A whole reply: header, the return values, then the error block.
pub fn encode_reply(
    name: &str,
    values: &[Value],
    error: &ErrorBlock,
) -> Result<Vec<u8>, WireError> {
    let mut body = encode_values(values)?;
    error.encode(&mut body)?;
    let mut out = Vec::with_capacity(HEADER_LEN + body.len());
    put_name(name, &mut out)?;
    put_len(body.len(), "body size", &mut out)?;
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(&body);
    Ok(out)
}

/// Decodes a reply header; returns the command name and the body size.
pub fn decode_reply_header(h: &[u8; HEADER_LEN]) -> Result<(String, usize), WireError> {
    let name = get_name(h)?;
    let size = body_size(h)?;
    if h[36..40] != [0; 4] {
        return err(format!(
            "reply header padding {:02x?} is not zero",
            &h[36..40]
        ));
    }
    Ok((name, size))
}

/// Decodes a reply body: the return values of `types`, then the error block; bytes left over
/// are an error.
pub fn decode_reply_body(body: &[u8], types: &[Ty]) -> Result<(Vec<Value>, ErrorBlock), WireError> {
    let mut r = Reader::new(body);
    let v = r.values(types)?;
    let e = ErrorBlock::decode(&mut r)?;
    if r.remaining() != 0 {
        return err(format!(
            "{} bytes left after the error block",
            r.remaining()
        ));
    }
    Ok((v, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_and_lying_inputs_are_errors_not_panics() {
        assert!(decode_values(&[0, 0], &[Ty::I32]).is_err());
        // A count of 2^31-1 with 4 bytes left: refused before allocating.
        let lie = [0x7f, 0xff, 0xff, 0xff, 0, 0, 0, 0];
        assert!(
            decode_values(&lie, &[Ty::ArrF64])
                .unwrap_err()
                .0
                .contains("count")
        );
        let lie2 = [0x7f, 0xff, 0xff, 0xff, 0x7f, 0xff, 0xff, 0xff];
        assert!(decode_values(&lie2, &[Ty::Arr2F32]).is_err());
        assert!(decode_values(&[0xff, 0xff, 0xff, 0xff], &[Ty::Str]).is_err());
        assert!(decode_values(&[0, 0, 0, 0, 1], &[Ty::I32]).is_err());
        let mut h = [0u8; HEADER_LEN];
        h[0] = 0xfe;
        assert!(decode_reply_header(&h).is_err());
        assert!(decode_request_header(&[0u8; HEADER_LEN]).is_err());
    }
}
