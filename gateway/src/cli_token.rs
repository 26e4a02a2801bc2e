//! `sovctl keys generate` and `sovctl token mint`: demo identity providers for the member
//! states. The private keys they write are for demos and tests; production tokens come
//! from the member states' own IdPs.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use crate::auth::{self, MintClaims, SigningAlg};
use crate::domain::{Classification, Country};

/// `sovctl token ...`
#[derive(Debug, clap::Subcommand)]
pub enum TokenCommand {
    /// Mint a token with a demo IdP's key and print it on stdout.
    Mint(MintArgs),
}

#[derive(Debug, clap::Args)]
pub struct MintArgs {
    /// Keys directory written by `sovctl keys generate`.
    #[arg(long, value_name = "DIR")]
    pub keys: PathBuf,
    /// Member state (two-letter code) whose IdP signs the token.
    #[arg(long, value_name = "CC")]
    pub state: Country,
    /// Ministry id (letters, digits, -_.:@).
    #[arg(long, value_name = "ID")]
    pub ministry: String,
    /// Highest data classification the caller may use: public, internal, restricted.
    #[arg(long, value_name = "C")]
    pub clearance: Classification,
    /// Default data classification of the caller's requests (not above the clearance).
    #[arg(long, value_name = "C")]
    pub classification: Option<Classification>,
    /// Role, e.g. `auditor`; repeat for several.
    #[arg(long = "role", value_name = "R")]
    pub roles: Vec<String>,
    /// Subject (`sub`), e.g. a user or service id.
    #[arg(long, value_name = "SUB")]
    pub subject: Option<String>,
    /// Lifetime: a number with s, m, h or d (30s, 15m, 1h, 2d).
    #[arg(long, default_value = "1h", value_parser = parse_ttl)]
    pub ttl: Duration,
}

/// `sovctl keys ...`
#[derive(Debug, clap::Subcommand)]
pub enum KeysCommand {
    /// Generate a member state's demo IdP key pair and JWKS into a keys directory.
    Generate(GenerateArgs),
}

#[derive(Debug, clap::Args)]
pub struct GenerateArgs {
    /// Keys directory (created if missing).
    #[arg(long, value_name = "DIR")]
    pub dir: PathBuf,
    /// Member state (two-letter code).
    #[arg(long, value_name = "CC")]
    pub state: Country,
    /// Signature algorithm: EdDSA, ES256 or RS256.
    #[arg(long, default_value = "EdDSA")]
    pub alg: SigningAlg,
    /// Token issuer (`iss`); default https://idp.<cc>.example.eu.
    #[arg(long, value_name = "URL")]
    pub issuer: Option<String>,
    /// Token audience (`aud`).
    #[arg(long, value_name = "AUD", default_value = auth::DEFAULT_AUDIENCE)]
    pub audience: String,
    /// Replace an existing key of this state.
    #[arg(long)]
    pub force: bool,
}

pub fn run_token(cmd: TokenCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        TokenCommand::Mint(args) => Ok(report(mint(&args))),
    }
}

pub fn run_keys(cmd: KeysCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        KeysCommand::Generate(args) => Ok(report(generate(&args))),
    }
}

fn report(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn mint(args: &MintArgs) -> anyhow::Result<()> {
    let keys = auth::load_state_keys(&args.keys, &args.state)?;
    if let Some(class) = args.classification
        && class > args.clearance
    {
        anyhow::bail!(
            "--classification {class} is above --clearance {}",
            args.clearance
        );
    }
    let claims = MintClaims {
        state: args.state.to_string(),
        ministry: args.ministry.clone(),
        clearance: args.clearance,
        classification: args.classification,
        roles: args.roles.clone(),
        subject: args.subject.clone(),
    };
    let token = keys.mint(&claims, args.ttl)?;
    println!("{token}");
    Ok(())
}

fn generate(args: &GenerateArgs) -> anyhow::Result<()> {
    let (key_path, jwks_path, idp_path) = auth::keys::key_paths(&args.dir, &args.state);
    if key_path.exists() && !args.force {
        anyhow::bail!(
            "{} already exists; pass --force to replace {}'s key (tokens signed with it stop \
             verifying)",
            key_path.display(),
            args.state
        );
    }
    let issuer = args
        .issuer
        .clone()
        .unwrap_or_else(|| auth::default_issuer(&args.state));
    let keys =
        auth::generate_state_keys(&args.dir, &args.state, args.alg, &issuer, &args.audience)?;
    eprintln!(
        "wrote {} (private, 0600), {} and {}",
        key_path.display(),
        jwks_path.display(),
        idp_path.display()
    );
    #[derive(serde::Serialize)]
    struct Snippet {
        member_state: Vec<auth::IssuerConfig>,
    }
    let snippet = toml::to_string(&Snippet {
        member_state: vec![keys.issuer_config(&args.dir)],
    })?;
    println!(
        "# gateway config for {} (kid {})\n{snippet}",
        args.state,
        keys.kid()
    );
    Ok(())
}

/// Parses `30s`, `15m`, `1h`, `2d` (or plain seconds).
pub fn parse_ttl(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let (digits, unit) = match text.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((i, _)) => text.split_at(i),
        None => (text, "s"),
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("`{text}` is not a duration like 30s, 15m, 1h or 2d"))?;
    let secs_per = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(format!("`{text}`: the unit must be s, m, h or d")),
    };
    let secs = n
        .checked_mul(secs_per)
        .ok_or_else(|| format!("`{text}` is too long"))?;
    if secs == 0 {
        return Err("the ttl must be positive".into());
    }
    Ok(Duration::from_secs(secs))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, clap::Parser)]
    struct Cli {
        #[command(subcommand)]
        cmd: Top,
    }
    #[derive(Debug, clap::Subcommand)]
    enum Top {
        #[command(subcommand)]
        Token(TokenCommand),
        #[command(subcommand)]
        Keys(KeysCommand),
    }

    #[test]
    fn ttl_units() {
        assert_eq!(parse_ttl("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_ttl("15m"), Ok(Duration::from_secs(900)));
        assert_eq!(parse_ttl("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_ttl("2d"), Ok(Duration::from_secs(172_800)));
        assert_eq!(parse_ttl("90"), Ok(Duration::from_secs(90)));
        assert!(parse_ttl("1w").is_err());
        assert!(parse_ttl("h").is_err());
        assert!(parse_ttl("0s").is_err());
        assert!(parse_ttl("-5s").is_err());
    }

    #[test]
    fn generate_then_mint_round_trip_and_errors() {
        let dir = std::env::temp_dir().join(format!("sov-cli-token-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let d = dir.to_str().unwrap();

        // Missing keys dir -> exit 1.
        let cli = Cli::try_parse_from([
            "sovctl",
            "token",
            "mint",
            "--keys",
            d,
            "--state",
            "at",
            "--ministry",
            "bmi",
            "--clearance",
            "internal",
        ])
        .unwrap();
        let Top::Token(cmd) = cli.cmd else { panic!() };
        assert_eq!(run_token(cmd).unwrap(), ExitCode::from(1));

        let cli = Cli::try_parse_from([
            "sovctl", "keys", "generate", "--dir", d, "--state", "at", "--alg", "ES256",
        ])
        .unwrap();
        let Top::Keys(cmd) = cli.cmd else { panic!() };
        assert_eq!(run_keys(cmd).unwrap(), ExitCode::SUCCESS);
        let info = auth::load_state_keys(&dir, &"AT".parse().unwrap()).unwrap();
        assert_eq!(info.issuer(), "https://idp.at.example.eu");
        assert_eq!(info.audience(), "sovereign-gateway");
        assert_eq!(info.alg(), SigningAlg::Es256);

        // A second generate without --force refuses to replace the key.
        let cli = Cli::try_parse_from(["sovctl", "keys", "generate", "--dir", d, "--state", "AT"])
            .unwrap();
        let Top::Keys(cmd) = cli.cmd else { panic!() };
        assert_eq!(run_keys(cmd).unwrap(), ExitCode::from(1));

        // Another state's files are missing -> exit 1.
        let cli = Cli::try_parse_from([
            "sovctl",
            "token",
            "mint",
            "--keys",
            d,
            "--state",
            "BE",
            "--ministry",
            "fod",
            "--clearance",
            "public",
        ])
        .unwrap();
        let Top::Token(cmd) = cli.cmd else { panic!() };
        assert_eq!(run_token(cmd).unwrap(), ExitCode::from(1));

        let cli = Cli::try_parse_from([
            "sovctl",
            "token",
            "mint",
            "--keys",
            d,
            "--state",
            "AT",
            "--ministry",
            "bmi",
            "--clearance",
            "restricted",
            "--classification",
            "internal",
            "--role",
            "auditor",
            "--ttl",
            "15m",
        ])
        .unwrap();
        let Top::Token(cmd) = cli.cmd else { panic!() };
        assert_eq!(run_token(cmd).unwrap(), ExitCode::SUCCESS);

        // Bad values are refused by the parser.
        assert!(
            Cli::try_parse_from([
                "sovctl",
                "token",
                "mint",
                "--keys",
                d,
                "--state",
                "AT",
                "--ministry",
                "bmi",
                "--clearance",
                "secret",
            ])
            .is_err()
        );
        assert!(
            Cli::try_parse_from([
                "sovctl", "keys", "generate", "--dir", d, "--state", "AT", "--alg", "HS256",
            ])
            .is_err()
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
