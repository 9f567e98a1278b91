//! SigV4 verification for `datapipeline-local`: rebuilds the canonical request from the headers the
//! client lists in `SignedHeaders`, derives the signing key from the secret of the access key the
//! `Credential` names, and compares signatures. Written with `hmac`/`sha2`; tested against
//! requests signed by `aws-sigv4` (tests/local_sigv4.rs) and by botocore (tests/py/).

use chrono::{DateTime, NaiveDateTime, TimeDelta, Utc};
use hmac::{Hmac, KeyInit, Mac};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;

/// The SigV4 signing name of the service.
pub const SERVICE: &str = "datapipeline";
/// AWS refuses a request whose `X-Amz-Date` is further than this from its clock.
pub const MAX_SKEW: TimeDelta = TimeDelta::minutes(15);

/// Why a request was refused, with the error names AWS JSON services answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No `Authorization` header at all.
    #[error("MissingAuthenticationTokenException: {0}")]
    Missing(String),
    /// The header does not parse, or a signed header is absent.
    #[error("IncompleteSignatureException: {0}")]
    Incomplete(String),
    /// The access key is not one of `--credentials`.
    #[error("UnrecognizedClientException: {0}")]
    UnknownKey(String),
    /// Wrong signature, or a date outside the 15-minute window (AWS answers both with this name).
    #[error("InvalidSignatureException: {0}")]
    BadSignature(String),
}

impl AuthError {
    /// The error name clients match on (the part after `#` of `__type`).
    pub fn code(&self) -> &'static str {
        match self {
            AuthError::Missing(_) => "MissingAuthenticationTokenException",
            AuthError::Incomplete(_) => "IncompleteSignatureException",
            AuthError::UnknownKey(_) => "UnrecognizedClientException",
            AuthError::BadSignature(_) => "InvalidSignatureException",
        }
    }
    pub fn status(&self) -> u16 {
        match self {
            AuthError::Missing(_) => 403,
            _ => 400,
        }
    }
    pub fn message(&self) -> &str {
        match self {
            AuthError::Missing(m)
            | AuthError::Incomplete(m)
            | AuthError::UnknownKey(m)
            | AuthError::BadSignature(m) => m,
        }
    }
}

/// What a verified request proved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    pub access_key: String,
    pub region: String,
}

/// The parts of a request that SigV4 covers.
pub struct RequestParts<'a> {
    pub method: &'a str,
    pub path: &'a str,
    pub query: &'a str,
    /// Header names in any case; repeated headers as separate entries.
    pub headers: &'a [(String, String)],
    pub body: &'a [u8],
}

/// Access key -> secret. `None` means "accept any well-formed signature" (no `--credentials`):
/// the signature is then not checked, only its shape and date.
pub type KeyRing = Option<BTreeMap<String, String>>;

fn hmac(key: &[u8], data: &[u8]) -> Vec<u8> {
    let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(key).expect("HMAC takes any key length");
    mac.update(data);
    mac.finalize().into_bytes().to_vec()
}

fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// RFC 3986 encoding as SigV4 wants it (unreserved characters kept).
fn uri_encode(s: &str, keep_slash: bool) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => out.push(b as char),
            b'/' if keep_slash => out.push('/'),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
            if let Ok(v) = u8::from_str_radix(hex, 16) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn canonical_query(query: &str) -> String {
    let mut pairs: Vec<(String, String)> = query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (
                uri_encode(&percent_decode(k), false),
                uri_encode(&percent_decode(v), false),
            )
        })
        .collect();
    pairs.sort();
    pairs
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join("&")
}

/// Non-S3 services encode each path segment once more ("double encoding").
fn canonical_path(path: &str) -> String {
    if path.is_empty() {
        return "/".into();
    }
    uri_encode(path, true)
}

fn header_value(headers: &[(String, String)], name: &str) -> Option<String> {
    let vals: Vec<String> = headers
        .iter()
        .filter(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect();
    (!vals.is_empty()).then(|| vals.join(","))
}

struct AuthHeader {
    access_key: String,
    date: String,
    region: String,
    service: String,
    signed_headers: Vec<String>,
    signature: String,
}

fn parse_authorization(value: &str) -> Result<AuthHeader, AuthError> {
    let incomplete = |m: &str| AuthError::Incomplete(format!("Authorization header {m}: {value}"));
    let rest = value
        .strip_prefix("AWS4-HMAC-SHA256")
        .ok_or_else(|| incomplete("does not use AWS4-HMAC-SHA256"))?;
    let mut credential = None;
    let mut signed = None;
    let mut signature = None;
    for part in rest.split(',') {
        let part = part.trim();
        if let Some(v) = part.strip_prefix("Credential=") {
            credential = Some(v.to_string());
        } else if let Some(v) = part.strip_prefix("SignedHeaders=") {
            signed = Some(v.to_string());
        } else if let Some(v) = part.strip_prefix("Signature=") {
            signature = Some(v.to_string());
        }
    }
    let credential = credential.ok_or_else(|| incomplete("lacks Credential"))?;
    let signed = signed.ok_or_else(|| incomplete("lacks SignedHeaders"))?;
    let signature = signature.ok_or_else(|| incomplete("lacks Signature"))?;
    let scope: Vec<&str> = credential.split('/').collect();
    if scope.len() != 5 || scope[4] != "aws4_request" || scope[0].is_empty() {
        return Err(incomplete("has a malformed Credential scope"));
    }
    Ok(AuthHeader {
        access_key: scope[0].into(),
        date: scope[1].into(),
        region: scope[2].into(),
        service: scope[3].into(),
        signed_headers: signed.split(';').map(|s| s.to_ascii_lowercase()).collect(),
        signature: signature.to_ascii_lowercase(),
    })
}

fn format_amz(t: DateTime<Utc>) -> String {
    t.format("%Y%m%dT%H%M%SZ").to_string()
}

/// Verifies a request at time `now`.
pub fn verify(req: &RequestParts<'_>, keys: &KeyRing, now: DateTime<Utc>) -> Result<Verified, AuthError> {
    let auth = header_value(req.headers, "authorization").ok_or_else(|| {
        AuthError::Missing("Missing Authentication Token (this endpoint needs SigV4-signed requests)".into())
    })?;
    let auth = parse_authorization(&auth)?;
    if auth.service != SERVICE {
        return Err(AuthError::BadSignature(format!(
            "Credential should be scoped to correct service: '{SERVICE}', not '{}'",
            auth.service
        )));
    }
    let amz_date = header_value(req.headers, "x-amz-date")
        .ok_or_else(|| AuthError::Incomplete("X-Amz-Date header is missing".into()))?;
    let when = NaiveDateTime::parse_from_str(&amz_date, "%Y%m%dT%H%M%SZ")
        .map_err(|_| AuthError::Incomplete(format!("X-Amz-Date {amz_date:?} is not YYYYMMDDTHHMMSSZ")))?
        .and_utc();
    if !amz_date.starts_with(&auth.date) {
        return Err(AuthError::BadSignature(format!(
            "Date in Credential scope does not match YYYYMMDD from ISO-8601 version of date from HTTP: '{}' != '{}'",
            auth.date,
            &amz_date[..8.min(amz_date.len())]
        )));
    }
    // The wording is AWS's, so that clients' clock-skew detection recognises it.
    if when < now - MAX_SKEW {
        return Err(AuthError::BadSignature(format!(
            "Signature expired: {} is now earlier than {} ({} - 15 min.)",
            amz_date,
            format_amz(now - MAX_SKEW),
            format_amz(now)
        )));
    }
    if when > now + MAX_SKEW {
        return Err(AuthError::BadSignature(format!(
            "Signature not yet current: {} is still later than {} ({} + 15 min.)",
            amz_date,
            format_amz(now + MAX_SKEW),
            format_amz(now)
        )));
    }
    if !auth.signed_headers.iter().any(|h| h == "host") {
        return Err(AuthError::Incomplete("SignedHeaders must include host".into()));
    }
    let secret = match keys {
        None => None,
        Some(ring) => Some(ring.get(&auth.access_key).ok_or_else(|| {
            AuthError::UnknownKey("The security token included in the request is invalid.".into())
        })?),
    };
    let mut canonical_headers = String::new();
    for name in &auth.signed_headers {
        let v = header_value(req.headers, name)
            .ok_or_else(|| AuthError::Incomplete(format!("signed header {name} is not in the request")))?;
        canonical_headers.push_str(&format!("{name}:{}\n", v.trim()));
    }
    let payload_hash = sha256_hex(req.body);
    if let Some(claimed) = header_value(req.headers, "x-amz-content-sha256") {
        if claimed != "UNSIGNED-PAYLOAD" && claimed != payload_hash {
            return Err(AuthError::BadSignature(
                "The provided x-amz-content-sha256 header does not match what was computed.".into(),
            ));
        }
    }
    let canonical = format!(
        "{}\n{}\n{}\n{}\n{}\n{}",
        req.method,
        canonical_path(req.path),
        canonical_query(req.query),
        canonical_headers,
        auth.signed_headers.join(";"),
        payload_hash
    );
    let scope = format!("{}/{}/{}/aws4_request", auth.date, auth.region, auth.service);
    let string_to_sign = format!(
        "AWS4-HMAC-SHA256\n{amz_date}\n{scope}\n{}",
        sha256_hex(canonical.as_bytes())
    );
    if let Some(secret) = secret {
        let k_date = hmac(format!("AWS4{secret}").as_bytes(), auth.date.as_bytes());
        let k_region = hmac(&k_date, auth.region.as_bytes());
        let k_service = hmac(&k_region, auth.service.as_bytes());
        let k_signing = hmac(&k_service, b"aws4_request");
        let expected = hex::encode(hmac(&k_signing, string_to_sign.as_bytes()));
        if !constant_time_eq(expected.as_bytes(), auth.signature.as_bytes()) {
            return Err(AuthError::BadSignature(
                "The request signature we calculated does not match the signature you provided. \
                 Check your AWS Secret Access Key and signing method. Consult the service documentation for details."
                    .into(),
            ));
        }
    } else if auth.signature.len() != 64 || !auth.signature.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(AuthError::Incomplete("Signature must be 64 hex digits".into()));
    }
    Ok(Verified {
        access_key: auth.access_key,
        region: auth.region,
    })
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_credential_types::Credentials;
    use aws_sigv4::http_request::{sign, SignableBody, SignableRequest, SigningSettings};
    use aws_sigv4::sign::v4;
    use std::time::SystemTime;

    fn signed(secret: &str, body: &[u8], at: SystemTime) -> Vec<(String, String)> {
        let identity = Credentials::new("AKIDLOCAL", secret, None, None, "test").into();
        let params = v4::SigningParams::builder()
            .identity(&identity)
            .region("us-east-1")
            .name(SERVICE)
            .time(at)
            .settings(SigningSettings::default())
            .build()
            .unwrap()
            .into();
        let headers = [
            ("host", "127.0.0.1:8990"),
            ("content-type", "application/x-amz-json-1.1"),
            ("x-amz-target", "DataPipeline.ListPipelines"),
        ];
        let req = SignableRequest::new(
            "POST",
            "http://127.0.0.1:8990/",
            headers.iter().copied(),
            SignableBody::Bytes(body),
        )
        .unwrap();
        let (instructions, _) = sign(req, &params).unwrap().into_parts();
        let mut out: Vec<(String, String)> = headers
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        for (k, v) in instructions.headers() {
            out.push((k.to_string(), v.to_string()));
        }
        out
    }

    fn ring() -> KeyRing {
        Some([("AKIDLOCAL".to_string(), "s3cret".to_string())].into())
    }

    fn parts<'a>(headers: &'a [(String, String)], body: &'a [u8]) -> RequestParts<'a> {
        RequestParts {
            method: "POST",
            path: "/",
            query: "",
            headers,
            body,
        }
    }

    #[test]
    fn accepts_aws_sigv4_and_refuses_tampering() {
        let now = SystemTime::now();
        let h = signed("s3cret", b"{}", now);
        let v = verify(&parts(&h, b"{}"), &ring(), Utc::now()).unwrap();
        assert_eq!(v.access_key, "AKIDLOCAL");
        assert_eq!(v.region, "us-east-1");
        let e = verify(&parts(&h, b"{ }"), &ring(), Utc::now()).unwrap_err();
        assert_eq!(e.code(), "InvalidSignatureException");
        let h2 = signed("wrong", b"{}", now);
        let e = verify(&parts(&h2, b"{}"), &ring(), Utc::now()).unwrap_err();
        assert_eq!(e.code(), "InvalidSignatureException");
        let e = verify(&parts(&h, b"{}"), &Some(Default::default()), Utc::now()).unwrap_err();
        assert_eq!(e.code(), "UnrecognizedClientException");
        let old = now - std::time::Duration::from_secs(16 * 60);
        let h3 = signed("s3cret", b"{}", old);
        let e = verify(&parts(&h3, b"{}"), &ring(), Utc::now()).unwrap_err();
        assert!(e.message().starts_with("Signature expired"), "{e}");
        // Without a key ring, any well-formed signature passes.
        assert!(verify(&parts(&h2, b"{}"), &None, Utc::now()).is_ok());
        let e = verify(&parts(&[], b"{}"), &None, Utc::now()).unwrap_err();
        assert_eq!(e.code(), "MissingAuthenticationTokenException");
    }
}
