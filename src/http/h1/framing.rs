//! How a message's body is framed (RFC 9112 §6): by `Transfer-Encoding`
//! (only `chunked`, last and once) or by one `Content-Length`, every copy
//! and list element the same number.

use http::{Method, StatusCode, Version};

use super::fields::{
    has_field, list, trim_ows_bytes, values, Fields, CONTENT_LENGTH, TRANSFER_ENCODING,
};
use super::message::{Framing, HeadError};

/// `Some(true)`: codings present and the last is `chunked` (only once);
/// `Some(false)`: codings present otherwise; `None`: no codings.
fn chunked_last(fields: &Fields<'_>) -> Option<bool> {
    let mut codings = list(fields, TRANSFER_ENCODING).peekable();
    codings.peek()?;
    let mut chunked_seen = false;
    let mut last_is_chunked = false;
    for coding in codings {
        last_is_chunked = coding.eq_ignore_ascii_case(b"chunked");
        if last_is_chunked && std::mem::replace(&mut chunked_seen, true) {
            return Some(false);
        }
    }
    Some(last_is_chunked)
}

/// The `Content-Length`: every copy and list element must be the same
/// decimal number.
fn content_length(fields: &Fields<'_>) -> Result<Option<u64>, HeadError> {
    let mut found = None;
    for value in values(fields, CONTENT_LENGTH) {
        // Bytes, not text: a digit, a comma or optional whitespace is
        // ASCII, and any other byte refuses the field.
        for element in value.split(|&b| b == b',') {
            let element = trim_ows_bytes(element);
            let n = element
                .iter()
                .try_fold(0u64, |n, &b| {
                    let digit = b.is_ascii_digit().then(|| u64::from(b - b'0'))?;
                    n.checked_mul(10)?.checked_add(digit)
                })
                .filter(|_| !element.is_empty())
                .ok_or(HeadError::ContentLength)?;
            if found.is_some_and(|f| f != n) {
                return Err(HeadError::ContentLength);
            }
            found = Some(n);
        }
    }
    Ok(found)
}

pub(super) fn request_framing(version: Version, fields: &Fields<'_>) -> Result<Framing, HeadError> {
    match chunked_last(fields) {
        Some(_) if version == Version::HTTP_10 => Err(HeadError::TransferEncoding),
        Some(_) if has_field(fields, CONTENT_LENGTH) => Err(HeadError::TransferAndLength),
        Some(true) if list(fields, TRANSFER_ENCODING).count() > 1 => {
            Err(HeadError::UnsupportedCoding)
        }
        Some(true) => Ok(Framing::Chunked),
        Some(false) => Err(HeadError::TransferEncoding),
        None => Ok(match content_length(fields)? {
            None | Some(0) => Framing::Empty,
            Some(n) => Framing::Length(n),
        }),
    }
}

/// RFC 9112 §6.3, for a response; `true` beside the framing when a
/// `Content-Length` sits beside `Transfer-Encoding` and must go (the coding
/// wins).
pub(super) fn response_framing(
    method: &Method,
    status: StatusCode,
    fields: &Fields<'_>,
) -> Result<(Framing, bool), HeadError> {
    if *method == Method::HEAD
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
    {
        return Ok((Framing::Empty, false));
    }
    match chunked_last(fields) {
        Some(chunked) => {
            let framing = if chunked {
                Framing::Chunked
            } else {
                Framing::UntilClose
            };
            Ok((framing, has_field(fields, CONTENT_LENGTH)))
        }
        None => Ok((
            match content_length(fields)? {
                None => Framing::UntilClose,
                Some(0) => Framing::Empty,
                Some(n) => Framing::Length(n),
            },
            false,
        )),
    }
}

/// At most one `Content-Length` field, holding one number.
pub(super) fn one_length(fields: &Fields<'_>) -> bool {
    let mut lengths = values(fields, CONTENT_LENGTH);
    lengths.next().is_none_or(|v| !v.contains(&b',')) && lengths.next().is_none()
}
