//! EC2 instance identity for PollForTask's `instanceIdentity` (issue 3 item 8): with IMDSv2, a
//! token `PUT /latest/api/token`, then `GET /latest/dynamic/instance-identity/document` and
//! `/signature`. Checked once per process and cached, including the negative answer, so that off
//! EC2 the poll is slowed at most once by [`IMDS_TIMEOUT`]. Never through a proxy (the metadata
//! service is link-local).
//!
//! Environment, as the AWS SDKs read it: `AWS_EC2_METADATA_DISABLED=true` turns it off;
//! `AWS_EC2_METADATA_SERVICE_ENDPOINT` overrides `http://169.254.169.254`.

use crate::model::InstanceIdentity;
use std::time::Duration;
use tokio::sync::OnceCell;

pub const DEFAULT_ENDPOINT: &str = "http://169.254.169.254";
/// Per request; IMDS answers in milliseconds on EC2, and off EC2 we must not hold up the poll.
pub const IMDS_TIMEOUT: Duration = Duration::from_secs(1);
const TOKEN_TTL_SECONDS: &str = "21600";

/// The instance identity source. Share one per process.
#[derive(Debug)]
pub struct Imds {
    endpoint: String,
    disabled: bool,
    timeout: Duration,
    cached: OnceCell<Option<InstanceIdentity>>,
}

impl Imds {
    pub fn new(endpoint: Option<String>, disabled: bool) -> Self {
        Imds {
            endpoint: endpoint
                .map(|e| e.trim().trim_end_matches('/').to_string())
                .filter(|e| !e.is_empty())
                .unwrap_or_else(|| DEFAULT_ENDPOINT.to_string()),
            disabled,
            timeout: IMDS_TIMEOUT,
            cached: OnceCell::new(),
        }
    }

    /// From `AWS_EC2_METADATA_DISABLED` and `AWS_EC2_METADATA_SERVICE_ENDPOINT`.
    pub fn from_env() -> Self {
        let disabled = std::env::var("AWS_EC2_METADATA_DISABLED")
            .map(|v| v.trim().eq_ignore_ascii_case("true"))
            .unwrap_or(false);
        Imds::new(std::env::var("AWS_EC2_METADATA_SERVICE_ENDPOINT").ok(), disabled)
    }

    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The signed identity document, or `None` off EC2 (or disabled). The first call asks IMDS;
    /// every later call returns the cached answer.
    pub async fn instance_identity(&self) -> Option<InstanceIdentity> {
        self.cached
            .get_or_init(|| async {
                if self.disabled {
                    tracing::debug!("IMDS disabled by AWS_EC2_METADATA_DISABLED");
                    return None;
                }
                match self.fetch().await {
                    Ok(id) => {
                        tracing::info!(endpoint = %self.endpoint, "running on EC2: PollForTask carries the instance identity");
                        Some(id)
                    }
                    Err(e) => {
                        tracing::info!(endpoint = %self.endpoint, "not on EC2 (instance metadata: {e}); PollForTask carries no instance identity");
                        None
                    }
                }
            })
            .await
            .clone()
    }

    async fn fetch(&self) -> Result<InstanceIdentity, String> {
        let client = crate::net::direct_http_client(self.timeout).map_err(|e| e.to_string())?;
        let token = client
            .put(format!("{}/latest/api/token", self.endpoint))
            .header("x-aws-ec2-metadata-token-ttl-seconds", TOKEN_TTL_SECONDS)
            .send()
            .await
            .map_err(|e| crate::net::error_chain(&e))?;
        if !token.status().is_success() {
            return Err(format!("token request answered HTTP {}", token.status().as_u16()));
        }
        let token = token.text().await.map_err(|e| crate::net::error_chain(&e))?;
        let get = |path: &'static str| {
            let client = client.clone();
            let url = format!("{}/latest/dynamic/instance-identity/{path}", self.endpoint);
            let token = token.trim().to_string();
            async move {
                let r = client
                    .get(url)
                    .header("x-aws-ec2-metadata-token", token)
                    .send()
                    .await
                    .map_err(|e| crate::net::error_chain(&e))?;
                if !r.status().is_success() {
                    return Err(format!("{path} answered HTTP {}", r.status().as_u16()));
                }
                let body = r.text().await.map_err(|e| crate::net::error_chain(&e))?;
                if body.trim().is_empty() {
                    return Err(format!("{path} is empty"));
                }
                Ok(body)
            }
        };
        let (document, signature) = tokio::try_join!(get("document"), get("signature"))?;
        Ok(InstanceIdentity {
            document,
            signature: signature.trim().to_string(),
        })
    }
}
