//! The HTTP(S) sink: one `POST` per delivery to a URL, any 2xx is acceptance. The body
//! (`--http-body`) is the change event with the full report, `{"change": …, "delivery": …,
//! "report": …}` (`both`, the default), the full report alone, `{"delivery": …, "report": …}`
//! (`full`), or the change event alone (`change`).
//! TLS is rustls (system roots plus an optional CA file), with an optional bearer token;
//! `Idempotency-Key` is `<vm>/<report id>`, so a retransmission the endpoint already stored is
//! harmless and two clones sharing an epoch never collide.

use std::{
    sync::Arc,
    time::{Duration, SystemTime},
};

use rustls::pki_types::{CertificateDer, pem::PemObject};

use super::{
    Delivery, HttpBody, SinkError, SinkOptions, envelope,
    event::{ChangeEvent, Changes},
};

pub struct HttpSink {
    client: reqwest::Client,
    url: String,
    token: Option<String>,
    body: HttpBody,
}

impl HttpSink {
    pub fn new(url: &str, options: &SinkOptions) -> Result<Self, SinkError> {
        reqwest::Url::parse(url).map_err(|e| SinkError::Config(format!("`{url}`: {e}")))?;
        let mut roots = rustls::RootCertStore::empty();
        let native = rustls_native_certs::load_native_certs();
        for cert in native.certs {
            // Unparseable system certificates are skipped, as browsers do.
            let _ = roots.add(cert);
        }
        if let Some(ca) = &options.ca_file {
            let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(ca)
                .map_err(|e| SinkError::Config(format!("CA file {}: {e}", ca.display())))?
                .collect::<Result<_, _>>()
                .map_err(|e| SinkError::Config(format!("CA file {}: {e}", ca.display())))?;
            if certs.is_empty() {
                return Err(SinkError::Config(format!(
                    "CA file {} holds no certificate",
                    ca.display()
                )));
            }
            for cert in certs {
                roots
                    .add(cert)
                    .map_err(|e| SinkError::Config(format!("CA file {}: {e}", ca.display())))?;
            }
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| SinkError::Config(format!("TLS: {e}")))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let client = reqwest::Client::builder()
            .use_preconfigured_tls(tls)
            .timeout(options.timeout)
            .connect_timeout(options.timeout.min(Duration::from_secs(5)))
            .user_agent(concat!("guestwatch-relay/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| SinkError::Config(format!("HTTP client: {e}")))?;
        Ok(Self {
            client,
            url: url.to_owned(),
            token: options.bearer_token.clone(),
            body: options.http_body,
        })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    pub async fn deliver(&self, delivery: &Delivery, changes: &Changes) -> Result<u64, SinkError> {
        let body = self
            .body_of(delivery, changes, SystemTime::now())
            .map_err(|e| SinkError::Http(e.to_string()))?;
        let bytes = body.len() as u64;
        let mut request = self
            .client
            .post(&self.url)
            .header("Content-Type", "application/json")
            .header("Idempotency-Key", delivery.idempotency_key())
            .header("X-Guestwatch-Vm", &delivery.vm)
            .header("X-Guestwatch-Report-Id", &delivery.report_id)
            .header("X-Guestwatch-Content-Hash", &delivery.content_hash)
            .body(body);
        if let Some(token) = &self.token {
            request = request.bearer_auth(token);
        }
        let response = request
            .send()
            .await
            .map_err(|e| SinkError::Http(error_chain(&e)))?;
        let status = response.status();
        if status.is_success() {
            return Ok(bytes);
        }
        let retry_after = response
            .headers()
            .get("Retry-After")
            .and_then(|v| v.to_str().ok())
            .and_then(parse_retry_after);
        Err(SinkError::HttpStatus {
            status: status.as_u16(),
            retry_after,
        })
    }
}

/// `Retry-After` in seconds (the HTTP-date form is rare for APIs and ignored).
impl HttpSink {
    fn body_of(
        &self,
        delivery: &Delivery,
        changes: &Changes,
        delivered_at: SystemTime,
    ) -> Result<Vec<u8>, serde_json::Error> {
        let event = || ChangeEvent::new(delivery, changes, delivered_at).to_json();
        Ok(match self.body {
            HttpBody::Full => envelope(delivery, delivered_at)?,
            HttpBody::Change => event()?,
            HttpBody::Both => {
                // `{"change":…,` then the envelope without its opening brace.
                let full = envelope(delivery, delivered_at)?;
                let event = event()?;
                let mut body = Vec::with_capacity(full.len() + event.len() + 12);
                body.extend_from_slice(b"{\"change\":");
                body.extend_from_slice(&event);
                body.push(b',');
                body.extend_from_slice(full.get(1..).unwrap_or_default());
                body
            }
        })
    }
}

fn parse_retry_after(value: &str) -> Option<Duration> {
    value
        .trim()
        .parse::<u64>()
        .ok()
        .map(|s| Duration::from_secs(s.min(3600)))
}

fn error_chain(error: &dyn std::error::Error) -> String {
    let mut message = error.to_string();
    let mut source = error.source();
    while let Some(inner) = source {
        message.push_str(": ");
        message.push_str(&inner.to_string());
        source = inner.source();
    }
    message
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_seconds() {
        assert_eq!(parse_retry_after("30"), Some(Duration::from_secs(30)));
        assert_eq!(parse_retry_after("999999"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"), None);
    }

    #[test]
    fn rejects_bad_urls_and_ca_files() {
        let opts = SinkOptions::defaults();
        assert!(HttpSink::new("http://", &opts).is_err());
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("ca.pem");
        std::fs::write(&empty, "not a certificate").unwrap();
        let with_ca = SinkOptions {
            ca_file: Some(empty),
            ..SinkOptions::defaults()
        };
        assert!(HttpSink::new("https://127.0.0.1:1/", &with_ca).is_err());
        assert!(HttpSink::new("https://127.0.0.1:1/", &opts).is_ok());
    }
}
