//! Credentials: `--accessId/--secretKey`, the `--config` JSON (`access-id`, `private-key`, optional
//! `session-token`), then the AWS default chain (aws-config). A credentials file readable by group
//! or others is refused. Secrets never appear in `Debug`, logs or errors.
//!
//! (Skeleton: the contract other modules build against.)

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
