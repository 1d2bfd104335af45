//! What every subcommand that asks the running synapse takes: its configuration (where its API
//! listens), the token and, with TLS, the CA.

/// Reaching the running synapse's admin API.
#[derive(clap::Args)]
pub struct AdminArgs {
    /// The configuration file of the running synapse.
    #[arg(long, short)]
    pub config: std::path::PathBuf,
    /// The environment variable holding the admin token.
    #[arg(long, default_value = "SYNAPSE_TOKEN")]
    pub token_env: String,
    /// With api.tls: the CA certificate (PEM) that signed the API's certificate.
    #[arg(long)]
    pub cacert: Option<std::path::PathBuf>,
}
