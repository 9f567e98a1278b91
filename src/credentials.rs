//! Credentials: `--accessId/--secretKey`, the `--config` JSON (`access-id`, `private-key`, optional
//! `session-token`), the `credentials-file` setting, `$CREDENTIALS_DIRECTORY/credentials.json`
//! (systemd `LoadCredential=`), then the AWS default chain (aws-config). The order is decided in
//! [`crate::config`]; this module owns the types, reading and checking the file, and redaction.
//! A credentials file readable by group or others is refused. Secrets never appear in `Debug`,
//! `Display`, logs or errors.

/// A secret string: `Debug` and `Display` print `<redacted>`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }
    /// The only way to read the secret; grep for it when auditing.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

/// Static keys.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StaticKeys {
    pub access_key_id: String,
    pub secret_access_key: Secret,
    pub session_token: Option<Secret>,
}

/// Where the runner's credentials come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CredentialSource {
    /// `--accessId/--secretKey` on the command line (visible in `ps`: warned about).
    CommandLine(StaticKeys),
    /// The `--config` JSON file (path kept for messages).
    File {
        path: std::path::PathBuf,
        keys: StaticKeys,
    },
    /// The AWS default chain: environment, profile, web identity, ECS/EC2 roles.
    DefaultChain,
}

impl std::fmt::Display for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

impl StaticKeys {
    /// The keys as aws-credential-types credentials, for a `SharedCredentialsProvider`.
    pub fn to_aws(&self, provider_name: &'static str) -> aws_credential_types::Credentials {
        aws_credential_types::Credentials::new(
            self.access_key_id.clone(),
            self.secret_access_key.expose().to_string(),
            self.session_token.as_ref().map(|t| t.expose().to_string()),
            None,
            provider_name,
        )
    }
}

impl CredentialSource {
    /// Where the credentials come from, for the startup log and `--check-config`; never the
    /// secret. The access key ID is shown: like AWS's own tools, it identifies but does not grant.
    pub fn describe(&self) -> String {
        match self {
            CredentialSource::CommandLine(k) => {
                format!("--accessId/--secretKey (access key {})", k.access_key_id)
            }
            CredentialSource::File { path, keys } => {
                format!("file {} (access key {})", path.display(), keys.access_key_id)
            }
            CredentialSource::DefaultChain => {
                "AWS default chain (environment, profile, web identity, ECS/EC2 instance role)".into()
            }
        }
    }

    /// The static keys, or `None` for the default chain.
    pub fn static_keys(&self) -> Option<&StaticKeys> {
        match self {
            CredentialSource::CommandLine(k) | CredentialSource::File { keys: k, .. } => Some(k),
            CredentialSource::DefaultChain => None,
        }
    }
}

/// A credentials file that cannot be used. The message says how to fix it.
#[derive(Debug, thiserror::Error)]
pub enum CredentialsError {
    #[error("{}: cannot read the credentials file: {source}", path.display())]
    Read {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// As ssh does for private keys: refuse a file others can read, and say how to fix it.
    #[error(
        "{}: permissions {mode:04o} are too open: a credentials file must not be readable by group or others. \
         Fix it with: chmod 600 {}",
        path.display(),
        path.display()
    )]
    TooOpen { path: std::path::PathBuf, mode: u32 },
    #[error("{}: {problem}", path.display())]
    Invalid {
        path: std::path::PathBuf,
        problem: String,
    },
}

/// The `--config` credentials JSON. Unknown keys are rejected so that a typo
/// (`"private_key"`) is not silently ignored in favour of the default chain.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct CredentialsJson {
    #[serde(rename = "access-id")]
    access_id: String,
    #[serde(rename = "private-key")]
    private_key: String,
    #[serde(rename = "session-token", default)]
    session_token: Option<String>,
}

/// Reads and checks a credentials JSON file (`access-id`, `private-key`, optional `session-token`).
/// The file must not be readable by group or others (mode 0600 or 0400).
pub fn read_credentials_file(path: &std::path::Path) -> Result<StaticKeys, CredentialsError> {
    use std::os::unix::fs::PermissionsExt;
    let read_err = |source| CredentialsError::Read {
        path: path.to_path_buf(),
        source,
    };
    let meta = std::fs::metadata(path).map_err(read_err)?;
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(CredentialsError::TooOpen {
            path: path.to_path_buf(),
            mode,
        });
    }
    let text = std::fs::read_to_string(path).map_err(read_err)?;
    parse_credentials_json(&text).map_err(|problem| CredentialsError::Invalid {
        path: path.to_path_buf(),
        problem,
    })
}

/// Parses the JSON text of a credentials file. The error never quotes a value: serde_json's
/// messages name keys and positions, and "invalid type" messages are replaced by our own.
fn parse_credentials_json(text: &str) -> Result<StaticKeys, String> {
    let raw: CredentialsJson = serde_json::from_str(text).map_err(|e| {
        let msg = e.to_string();
        if msg.starts_with("unknown field") || msg.starts_with("missing field") {
            format!(
                "{msg}; the file holds {{\"access-id\": \"...\", \"private-key\": \"...\"}} and optionally \"session-token\""
            )
        } else if e.is_data() {
            format!(
                "at line {} column {}: every value must be a string; the file holds \
                 {{\"access-id\": \"...\", \"private-key\": \"...\"}} and optionally \"session-token\"",
                e.line(),
                e.column()
            )
        } else {
            format!("not valid JSON (line {} column {})", e.line(), e.column())
        }
    })?;
    if raw.access_id.trim().is_empty() {
        return Err("\"access-id\" is empty".into());
    }
    if raw.private_key.trim().is_empty() {
        return Err("\"private-key\" is empty".into());
    }
    Ok(StaticKeys {
        access_key_id: raw.access_id.trim().to_string(),
        secret_access_key: Secret::new(raw.private_key.trim()),
        session_token: raw
            .session_token
            .filter(|t| !t.trim().is_empty())
            .map(|t| Secret::new(t.trim())),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    const SECRET: &str = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY";

    fn write(dir: &std::path::Path, name: &str, text: &str, mode: u32) -> std::path::PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        p
    }

    #[test]
    fn reads_a_private_file() {
        let d = tempfile::tempdir().unwrap();
        let p = write(
            d.path(),
            "c.json",
            &format!(r#"{{ "access-id": "AKIDEXAMPLE", "private-key": "{SECRET}" }}"#),
            0o600,
        );
        let k = read_credentials_file(&p).unwrap();
        assert_eq!(k.access_key_id, "AKIDEXAMPLE");
        assert_eq!(k.secret_access_key.expose(), SECRET);
        assert_eq!(k.session_token, None);
        let p = write(
            d.path(),
            "t.json",
            &format!(r#"{{"access-id":"A","private-key":"{SECRET}","session-token":"TOK"}}"#),
            0o400,
        );
        assert_eq!(
            read_credentials_file(&p).unwrap().session_token.unwrap().expose(),
            "TOK"
        );
    }

    #[test]
    fn refuses_group_or_world_readable_files_with_the_fix() {
        let d = tempfile::tempdir().unwrap();
        for mode in [0o640, 0o604, 0o644, 0o660] {
            let p = write(d.path(), "c.json", r#"{"access-id":"A","private-key":"B"}"#, mode);
            let e = read_credentials_file(&p).unwrap_err();
            assert!(matches!(e, CredentialsError::TooOpen { .. }), "{mode:o}: {e}");
            let msg = e.to_string();
            assert!(msg.contains(&format!("chmod 600 {}", p.display())), "{msg}");
            assert!(msg.contains(&format!("{mode:04o}")), "{msg}");
        }
    }

    #[test]
    fn bad_json_unknown_keys_and_missing_keys_are_named() {
        let d = tempfile::tempdir().unwrap();
        let cases = [
            (
                r#"{"access-id":"A","private-key":"B","region":"x"}"#,
                "unknown field `region`",
            ),
            (
                r#"{"access-id":"A","private_key":"B"}"#,
                "unknown field `private_key`",
            ),
            (r#"{"access-id":"A"}"#, "missing field `private-key`"),
            (r#"{"access-id":"A","private-key":"#, "not valid JSON"),
            (
                r#"{"access-id":"A","private-key":""}"#,
                "\"private-key\" is empty",
            ),
            (r#"{"access-id":"A","private-key":42}"#, "must be a string"),
        ];
        for (text, want) in cases {
            let p = write(d.path(), "c.json", text, 0o600);
            let e = read_credentials_file(&p).unwrap_err().to_string();
            assert!(e.contains(want), "{text}: {e}");
            assert!(e.contains(&p.display().to_string()), "{e}");
        }
        let e = read_credentials_file(&d.path().join("missing.json")).unwrap_err();
        assert!(matches!(e, CredentialsError::Read { .. }));
    }

    #[test]
    fn secrets_never_print() {
        let keys = StaticKeys {
            access_key_id: "AKID".into(),
            secret_access_key: Secret::new(SECRET),
            session_token: Some(Secret::new("TOKEN-VALUE")),
        };
        let src = CredentialSource::File {
            path: "/x".into(),
            keys: keys.clone(),
        };
        for text in [
            format!("{keys:?}"),
            format!("{src:?}"),
            src.describe(),
            format!("{}", keys.secret_access_key),
        ] {
            assert!(!text.contains(SECRET) && !text.contains("TOKEN-VALUE"), "{text}");
        }
        // a bad value is not quoted back in errors either
        let e = parse_credentials_json(&format!(r#"{{"access-id":"A","private-key":["{SECRET}"]}}"#))
            .unwrap_err();
        assert!(!e.contains(SECRET), "{e}");
    }
}
