//! The one place where proxy and TLS settings (`Settings.proxy`, `Settings.ca_bundle`, and
//! `HTTPS_PROXY`/`HTTP_PROXY`/`NO_PROXY` from the environment) become HTTP clients:
//! - [`http_client`]: the reqwest client of the Data Pipeline API client ([`crate::api::http`]);
//! - [`smithy_http_client`]: the same proxy and CA bundle for every AWS SDK client (S3) and for
//!   aws-config's own credential providers (STS, SSO, IMDS, ECS) through [`sdk_config`];
//! - [`s3_client`] and [`credentials_provider`], built on [`sdk_config`].
//!
//! Both stacks use rustls with the `ring` provider. The EC2/ECS metadata addresses are always
//! exempt from the proxy: a corporate proxy cannot reach the instance's link-local endpoints
//! (the AWS CLI and SDKs exempt them too). The IMDS client of [`crate::api::imds`] does not use
//! these clients at all.
//!
//! Proxy precedence: an explicit `Settings.proxy` (the jar's `--proxyHost/--proxyPort/...`) wins;
//! otherwise the environment as the AWS CLI reads it (`HTTPS_PROXY` for https URLs, `HTTP_PROXY`
//! for http URLs, `NO_PROXY`; lower-case forms too), per
//! `shared/reference/dp-guide/dp-taskrunner-proxy.md`.

use crate::config::{ProxySettings, Settings};
use crate::credentials::CredentialSource;
use aws_config::{BehaviorVersion, SdkConfig};
use aws_credential_types::provider::SharedCredentialsProvider;
use aws_smithy_http_client::{proxy::ProxyConfig, tls, Connector};
use aws_smithy_runtime_api::client::http::SharedHttpClient;
use aws_smithy_types::timeout::TimeoutConfig;
use std::time::Duration;

/// TCP + TLS connect: long enough for a slow proxy, short enough to notice an outage.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Read timeout between bytes: above the 90 s long poll of PollForTask ([`crate::api::LONG_POLL`]).
pub const READ_TIMEOUT: Duration = Duration::from_secs(120);
/// Link-local metadata endpoints (EC2 IMDS v4/v6, ECS task credentials): never proxied.
pub const METADATA_NO_PROXY: &str = "169.254.169.254,fd00:ec2::254,169.254.170.2,169.254.170.23";

/// The part of [`Settings`] that outbound clients need. Every function here accepts `&Settings`
/// or a `NetSettings` (tests build one directly without the whole configuration).
#[derive(Clone, Debug)]
pub struct NetSettings {
    pub region: String,
    /// The Data Pipeline endpoint URL.
    pub endpoint: String,
    pub proxy: Option<ProxySettings>,
    pub ca_bundle: Option<std::path::PathBuf>,
    pub s3_endpoint: Option<String>,
    /// The jar's `--s3NoProxy`: S3 clients connect directly even when a proxy is set.
    pub s3_no_proxy: bool,
    pub credentials: CredentialSource,
}

impl From<&Settings> for NetSettings {
    fn from(s: &Settings) -> Self {
        NetSettings {
            region: s.region.clone(),
            endpoint: s.endpoint.clone(),
            proxy: s.proxy.clone(),
            ca_bundle: s.ca_bundle.clone(),
            s3_endpoint: s.s3_endpoint.clone(),
            s3_no_proxy: s.s3_no_proxy,
            credentials: s.credentials.clone(),
        }
    }
}

impl From<&NetSettings> for NetSettings {
    fn from(s: &NetSettings) -> Self {
        s.clone()
    }
}

/// A setting that cannot become a client. The message names the setting; never a password.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("proxy {url:?}: {reason}")]
    Proxy { url: String, reason: String },
    #[error("ca-bundle {path}: {reason}")]
    CaBundle { path: String, reason: String },
    #[error("building the HTTP client: {0}")]
    Build(String),
}

/// Installs rustls' `ring` provider as the process default, once. reqwest is built with
/// `rustls-no-provider`, so without this it would have no crypto at all.
pub fn install_crypto_provider() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // Err means another provider was installed first (by a test or a dependency): keep it.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

/// The proxy the outbound clients use, resolved once from the settings or the environment.
#[derive(Clone, PartialEq, Eq)]
pub struct ProxyPlan {
    /// Proxy for `https://` URLs.
    pub https: Option<String>,
    /// Proxy for `http://` URLs.
    pub http: Option<String>,
    pub username: Option<String>,
    pub password: Option<String>,
    /// `NO_PROXY` syntax; always contains [`METADATA_NO_PROXY`].
    pub no_proxy: String,
    /// "settings" or "environment", for the startup log.
    pub source: &'static str,
}

impl std::fmt::Debug for ProxyPlan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProxyPlan")
            .field("https", &self.https.as_deref().map(redact_userinfo))
            .field("http", &self.http.as_deref().map(redact_userinfo))
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("no_proxy", &self.no_proxy)
            .field("source", &self.source)
            .finish()
    }
}

/// `http://user:pw@host:3128` -> `http://user:<redacted>@host:3128`, for messages and logs.
pub fn redact_userinfo(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some("redacted"));
            u.to_string()
        }
        _ => url.to_string(),
    }
}

fn env_var(names: &[&str]) -> Option<String> {
    names
        .iter()
        .filter_map(|n| std::env::var(n).ok())
        .map(|v| v.trim().to_string())
        .find(|v| !v.is_empty())
}

fn join_no_proxy(user: Option<&str>) -> String {
    match user.map(str::trim).filter(|s| !s.is_empty()) {
        Some(u) => format!("{u},{METADATA_NO_PROXY}"),
        None => METADATA_NO_PROXY.to_string(),
    }
}

/// Proxy URLs without a scheme (`proxy.corp:3128`, as `HTTPS_PROXY` is often written) get `http://`.
fn normalize_proxy_url(raw: &str) -> Result<String, NetError> {
    let with_scheme = if raw.contains("://") {
        raw.to_string()
    } else {
        format!("http://{raw}")
    };
    let u = url::Url::parse(&with_scheme).map_err(|e| NetError::Proxy {
        url: redact_userinfo(raw),
        reason: e.to_string(),
    })?;
    if !matches!(u.scheme(), "http" | "https") || u.host_str().is_none() {
        return Err(NetError::Proxy {
            url: redact_userinfo(raw),
            reason: "expected http://host:port".into(),
        });
    }
    Ok(with_scheme)
}

impl ProxyPlan {
    /// `None`: connect directly.
    pub fn resolve(settings: &NetSettings) -> Result<Option<ProxyPlan>, NetError> {
        let plan = Self::resolve_configured(settings)?;
        // `no_proxy = "*"` bypasses the proxy for every host. hyper-util's matcher applies `*` to
        // host names only, not to IP addresses (127.0.0.1 would still go through the proxy), so
        // a `*` entry means no proxy at all.
        Ok(plan.filter(|p| !p.no_proxy.split(',').any(|e| e.trim() == "*")))
    }

    fn resolve_configured(settings: &NetSettings) -> Result<Option<ProxyPlan>, NetError> {
        if let Some(p) = &settings.proxy {
            let url = normalize_proxy_url(&p.url)?;
            return Ok(Some(ProxyPlan {
                https: Some(url.clone()),
                http: Some(url),
                username: p.username.clone(),
                password: p.password.as_ref().map(|s| s.expose().to_string()),
                no_proxy: join_no_proxy(p.no_proxy.as_deref()),
                source: "settings",
            }));
        }
        let https = env_var(&["HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"]);
        let http = env_var(&["HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"]);
        if https.is_none() && http.is_none() {
            return Ok(None);
        }
        Ok(Some(ProxyPlan {
            https: https.as_deref().map(normalize_proxy_url).transpose()?,
            http: http.as_deref().map(normalize_proxy_url).transpose()?,
            username: None,
            password: None,
            no_proxy: join_no_proxy(env_var(&["NO_PROXY", "no_proxy"]).as_deref()),
            source: "environment",
        }))
    }

    fn reqwest_proxies(&self) -> Result<Vec<reqwest::Proxy>, NetError> {
        let no_proxy = reqwest::NoProxy::from_string(&self.no_proxy);
        let mut out = Vec::new();
        let mk = |url: &str, https: bool| -> Result<reqwest::Proxy, NetError> {
            let p = if https {
                reqwest::Proxy::https(url)
            } else {
                reqwest::Proxy::http(url)
            }
            .map_err(|e| NetError::Proxy {
                url: redact_userinfo(url),
                reason: e.to_string(),
            })?;
            let p = match (&self.username, &self.password) {
                (Some(u), pw) => p.basic_auth(u, pw.as_deref().unwrap_or("")),
                _ => p,
            };
            Ok(p.no_proxy(no_proxy.clone()))
        };
        if let Some(u) = &self.https {
            out.push(mk(u, true)?);
        }
        if let Some(u) = &self.http {
            out.push(mk(u, false)?);
        }
        Ok(out)
    }

    fn smithy_proxy(&self) -> Result<ProxyConfig, NetError> {
        let err = |url: &str, e: aws_smithy_http_client::proxy::ProxyError| NetError::Proxy {
            url: redact_userinfo(url),
            reason: e.to_string(),
        };
        // One smithy ProxyConfig carries one proxy URL. When the environment names two different
        // proxies for http and https, let hyper-util read the environment itself (it honours
        // NO_PROXY, but cannot add the metadata exemption).
        let cfg = match (&self.https, &self.http) {
            (Some(s), Some(h)) if s == h => ProxyConfig::all(s.as_str()).map_err(|e| err(s, e))?,
            (Some(s), None) => ProxyConfig::https(s.as_str()).map_err(|e| err(s, e))?,
            (None, Some(h)) => ProxyConfig::http(h.as_str()).map_err(|e| err(h, e))?,
            (Some(_), Some(_)) => return Ok(ProxyConfig::from_env()),
            (None, None) => return Ok(ProxyConfig::disabled()),
        };
        let cfg = match (&self.username, &self.password) {
            (Some(u), pw) => cfg.with_basic_auth(u.clone(), pw.clone().unwrap_or_default()),
            _ => cfg,
        };
        Ok(cfg.no_proxy(&self.no_proxy))
    }
}

fn read_ca_bundle(settings: &NetSettings) -> Result<Option<Vec<u8>>, NetError> {
    let Some(path) = &settings.ca_bundle else {
        return Ok(None);
    };
    let bytes = std::fs::read(path).map_err(|e| NetError::CaBundle {
        path: path.display().to_string(),
        reason: e.to_string(),
    })?;
    Ok(Some(bytes))
}

fn reqwest_certs(settings: &NetSettings) -> Result<Vec<reqwest::Certificate>, NetError> {
    let Some(bytes) = read_ca_bundle(settings)? else {
        return Ok(Vec::new());
    };
    let path = settings
        .ca_bundle
        .as_ref()
        .map(|p| p.display().to_string())
        .unwrap_or_default();
    let certs = reqwest::Certificate::from_pem_bundle(&bytes).map_err(|e| NetError::CaBundle {
        path: path.clone(),
        reason: e.to_string(),
    })?;
    if certs.is_empty() {
        return Err(NetError::CaBundle {
            path,
            reason: "no PEM certificate in the file".into(),
        });
    }
    Ok(certs)
}

fn user_agent() -> String {
    format!("taskrunner/{}", env!("CARGO_PKG_VERSION"))
}

/// The reqwest client of the Data Pipeline client: rustls (ring), system roots plus the CA
/// bundle, the proxy plan, connect timeout [`CONNECT_TIMEOUT`], read timeout [`READ_TIMEOUT`].
/// Per-call deadlines are set by the caller on each request.
pub fn http_client(settings: impl Into<NetSettings>) -> Result<reqwest::Client, NetError> {
    let settings = &settings.into();
    install_crypto_provider();
    let mut b = reqwest::Client::builder()
        .user_agent(user_agent())
        .connect_timeout(CONNECT_TIMEOUT)
        .read_timeout(READ_TIMEOUT)
        .pool_idle_timeout(Duration::from_secs(50))
        // The API is `POST /` only: a redirect would be a misconfigured endpoint or proxy.
        .redirect(reqwest::redirect::Policy::none())
        // We decide the proxy (the plan already read the environment); reqwest must not add its own.
        .no_proxy();
    let certs = reqwest_certs(settings)?;
    if !certs.is_empty() {
        b = b.tls_certs_merge(certs);
    }
    if let Some(plan) = ProxyPlan::resolve(settings)? {
        for p in plan.reqwest_proxies()? {
            b = b.proxy(p);
        }
    }
    b.build().map_err(|e| NetError::Build(error_chain(&e)))
}

/// A reqwest client that never uses a proxy, for the instance metadata service.
pub fn direct_http_client(timeout: Duration) -> Result<reqwest::Client, NetError> {
    install_crypto_provider();
    reqwest::Client::builder()
        .user_agent(user_agent())
        .no_proxy()
        .connect_timeout(timeout)
        .timeout(timeout)
        .build()
        .map_err(|e| NetError::Build(error_chain(&e)))
}

/// The HTTP client for every AWS SDK client and aws-config's credential providers: the SAME proxy
/// plan, no_proxy and CA bundle as [`http_client`], rustls with ring.
pub fn smithy_http_client(settings: impl Into<NetSettings>) -> Result<SharedHttpClient, NetError> {
    build_smithy_http_client(&settings.into(), true)
}

fn build_smithy_http_client(settings: &NetSettings, use_proxy: bool) -> Result<SharedHttpClient, NetError> {
    install_crypto_provider();
    let proxy = match ProxyPlan::resolve(settings)? {
        Some(plan) if use_proxy => plan.smithy_proxy()?,
        // Explicitly disabled: without a plan there is no proxy in the environment either.
        _ => ProxyConfig::disabled(),
    };
    let mut trust = tls::TrustStore::default();
    if let Some(pem) = read_ca_bundle(settings)? {
        // Validate now so that a bad bundle is a startup error, not a failure on first use.
        let path = settings
            .ca_bundle
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        match reqwest::Certificate::from_pem_bundle(&pem) {
            Ok(c) if !c.is_empty() => {}
            Ok(_) => {
                return Err(NetError::CaBundle {
                    path,
                    reason: "no PEM certificate in the file".into(),
                })
            }
            Err(e) => {
                return Err(NetError::CaBundle {
                    path,
                    reason: e.to_string(),
                })
            }
        }
        trust = trust.with_pem_certificate(pem);
    }
    let tls_context = tls::TlsContext::builder()
        .with_trust_store(trust)
        .build()
        .map_err(|e| NetError::Build(e.to_string()))?;
    // The public `Builder` has no proxy setter; `build_with_connector_fn` keeps its per-settings
    // connector cache (so connections are pooled) while we build each connector with the proxy.
    Ok(
        aws_smithy_http_client::Builder::new().build_with_connector_fn(move |conn_settings, components| {
            let mut b = Connector::builder();
            b.set_connector_settings(conn_settings.cloned());
            if let Some(c) = components {
                b.set_sleep_impl(c.sleep_impl());
            }
            b.proxy_config(proxy.clone())
                .tls_provider(tls::Provider::Rustls(tls::rustls_provider::CryptoMode::Ring))
                .tls_context(tls_context.clone())
                .build()
        }),
    )
}

fn timeouts() -> TimeoutConfig {
    TimeoutConfig::builder()
        .connect_timeout(CONNECT_TIMEOUT)
        .read_timeout(READ_TIMEOUT)
        .build()
}

/// Static keys as an SDK credentials provider (the name shows in SDK debug logs, not the key).
fn static_provider(source: &CredentialSource) -> Option<SharedCredentialsProvider> {
    let (keys, name) = match source {
        CredentialSource::CommandLine(k) => (k, "taskrunner-command-line"),
        CredentialSource::File { keys, .. } => (keys, "taskrunner-credentials-file"),
        CredentialSource::DefaultChain => return None,
    };
    Some(SharedCredentialsProvider::new(
        aws_credential_types::Credentials::new(
            keys.access_key_id.clone(),
            keys.secret_access_key.expose().to_string(),
            keys.session_token.as_ref().map(|t| t.expose().to_string()),
            None,
            name,
        ),
    ))
}

/// Region, [`smithy_http_client`] (used by every AWS client AND by aws-config's own credential
/// providers: STS, SSO, IMDS, ECS), timeouts, and the credentials of `Settings.credentials`.
pub async fn sdk_config(settings: impl Into<NetSettings>) -> Result<SdkConfig, NetError> {
    let settings = &settings.into();
    let http = smithy_http_client(settings)?;
    let mut loader = aws_config::defaults(BehaviorVersion::latest())
        .region(aws_config::Region::new(settings.region.clone()))
        .http_client(http)
        .timeout_config(timeouts());
    if let Some(p) = static_provider(&settings.credentials) {
        loader = loader.credentials_provider(p);
    }
    Ok(loader.load().await)
}

/// Static keys from `Settings.credentials`, or aws-config's default chain (environment, profile,
/// web identity, SSO, ECS, EC2 instance role) using [`smithy_http_client`].
pub async fn credentials_provider(
    settings: impl Into<NetSettings>,
) -> Result<SharedCredentialsProvider, NetError> {
    let settings = &settings.into();
    if let Some(p) = static_provider(&settings.credentials) {
        return Ok(p);
    }
    let cfg = sdk_config(settings).await?;
    cfg.credentials_provider()
        .ok_or_else(|| NetError::Build("aws-config produced no credentials provider".into()))
}

/// The S3 client from an [`SdkConfig`]: with `Settings.s3_endpoint`, that endpoint and path-style
/// addressing (local S3 implementations serve no virtual-host buckets).
pub fn s3_client_from(
    sdk: &SdkConfig,
    settings: impl Into<NetSettings>,
) -> Result<aws_sdk_s3::Client, NetError> {
    let settings = &settings.into();
    let mut b = aws_sdk_s3::config::Builder::from(sdk);
    if settings.s3_no_proxy {
        b = b.http_client(build_smithy_http_client(settings, false)?);
    }
    if let Some(ep) = &settings.s3_endpoint {
        b = b.endpoint_url(ep.clone()).force_path_style(true);
    }
    Ok(aws_sdk_s3::Client::from_conf(b.build()))
}

/// [`s3_client_from`] over a fresh [`sdk_config`].
pub async fn s3_client(settings: impl Into<NetSettings>) -> Result<aws_sdk_s3::Client, NetError> {
    let settings = &settings.into();
    let sdk = sdk_config(settings).await?;
    s3_client_from(&sdk, settings)
}

/// `e: source: source...` in one line (reqwest hides the useful part in the source chain).
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let cs = c.to_string();
        if !s.contains(&cs) {
            s.push_str(": ");
            s.push_str(&cs);
        }
        cur = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_password_in_proxy_url() {
        let r = redact_userinfo("http://bob:hunter2@proxy:3128");
        assert!(!r.contains("hunter2"), "{r}");
        assert!(r.contains("bob"), "{r}");
    }

    #[test]
    fn proxy_url_without_scheme_gets_http() {
        assert_eq!(
            normalize_proxy_url("proxy.corp:3128").unwrap(),
            "http://proxy.corp:3128"
        );
        assert!(normalize_proxy_url("ftp://x:1").is_err());
    }

    #[test]
    fn metadata_always_exempt() {
        assert_eq!(join_no_proxy(None), METADATA_NO_PROXY);
        assert!(join_no_proxy(Some("corp.example")).starts_with("corp.example,169.254.169.254"));
    }
}
