//! The admin API as the CLI reaches a running synapse: at the configured `api.listen` (a
//! wildcard address on loopback), over TLS when `api.tls` is set (its certificate names
//! `localhost`; `cacert` trusts a private CA), with a bearer token from the environment.

use crate::config::Config;
use serde_json::Value;
use std::path::Path;

pub struct AdminClient {
    http: reqwest::Client,
    base: String,
    addr: String,
    token: Option<String>,
}

impl AdminClient {
    /// A client of `config`'s API; `token_env` names the variable holding the token (required
    /// when the configuration has `api.tokens`).
    pub async fn new(config: &Config, token_env: &str, cacert: Option<&Path>) -> anyhow::Result<AdminClient> {
        let listen = &config.api.listen;
        if listen.is_empty() {
            anyhow::bail!(
                "api.listen is \"\": the process serves no API to ask; set api.listen and restart it \
                 (to retry parked components without the API, send it SIGHUP)"
            );
        }
        let addr = listen.replace("0.0.0.0:", "127.0.0.1:").replace("[::]:", "[::1]:");
        let mut http = reqwest::Client::builder();
        let base = match &config.api.tls {
            None => format!("http://{addr}"),
            Some(_) => {
                // The certificate names the host, not the address: ask for localhost, reach
                // the configured address.
                let socket: std::net::SocketAddr = tokio::net::lookup_host(&addr)
                    .await?
                    .next()
                    .ok_or_else(|| anyhow::anyhow!("api.listen: {addr} resolves to nothing"))?;
                http = http.resolve("localhost", socket).use_rustls_tls();
                if let Some(ca) = cacert {
                    let bad = |e: &dyn std::fmt::Display| anyhow::anyhow!("--cacert {}: {e}", ca.display());
                    let pem = std::fs::read(ca).map_err(|e| bad(&e))?;
                    http = http.add_root_certificate(reqwest::Certificate::from_pem(&pem).map_err(|e| bad(&e))?);
                }
                format!("https://localhost:{}", socket.port())
            }
        };
        let token = match std::env::var(token_env) {
            Ok(t) => Some(t.trim().to_owned()),
            Err(_) if !config.api.tokens.is_empty() => {
                anyhow::bail!("set {token_env} to a token with the admin scope (api.tokens)")
            }
            Err(_) => None,
        };
        Ok(AdminClient { http: http.build()?, base, addr, token })
    }

    /// POSTs `body` to `path`; an error answer becomes an error with its message and hint.
    pub async fn post(&self, path: &str, body: &Value) -> anyhow::Result<Value> {
        let request = self
            .http
            .post(format!("{}{path}", self.base))
            .header("content-type", "application/json")
            .body(body.to_string());
        self.send(request).await
    }

    /// GETs `path`, as [`Self::post`].
    pub async fn get(&self, path: &str) -> anyhow::Result<Value> {
        self.send(self.http.get(format!("{}{path}", self.base))).await
    }

    async fn send(&self, mut request: reqwest::RequestBuilder) -> anyhow::Result<Value> {
        if let Some(t) = &self.token {
            request = request.bearer_auth(t);
        }
        let response =
            request.send().await.map_err(|e| anyhow::anyhow!("cannot reach the API at {}: {e}", self.addr))?;
        let status = response.status();
        let body: Value = serde_json::from_slice(&response.bytes().await.unwrap_or_default()).unwrap_or_default();
        if !status.is_success() {
            let e = &body["error"];
            anyhow::bail!("{status}: {} ({})", e["message"].as_str().unwrap_or("?"), e["hint"].as_str().unwrap_or(""));
        }
        Ok(body)
    }
}
