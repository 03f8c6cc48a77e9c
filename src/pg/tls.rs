//! TLS to PostgreSQL with libpq's settings and meaning, so that a conninfo
//! that works for `psql` works for reentry:
//!
//! - `sslmode`: `disable`, `allow`, `prefer` (the default), `require`,
//!   `verify-ca`, `verify-full`;
//! - `sslrootcert` (a PEM file, or `system` for OpenSSL's default trust
//!   store), default `~/.postgresql/root.crt` when it exists. As in libpq,
//!   when a root certificate is there the chain is verified in every mode
//!   (`require` then acts as `verify-ca`), and `system` takes `verify-full`;
//! - `sslcert` and `sslkey` (defaults `~/.postgresql/postgresql.crt` and
//!   `.key` when they exist), `sslpassword` for an encrypted key; a key
//!   readable by group or others is refused, as libpq refuses it;
//! - `sslnegotiation=direct` (PostgreSQL 17 and later), only with
//!   `require` or stronger, with ALPN `postgresql`.
//!
//! Each comes from the conninfo (key/value or URI query), else the
//! environment (`PGSSLMODE`, `PGSSLROOTCERT`, `PGSSLCERT`, `PGSSLKEY`,
//! `PGSSLNEGOTIATION`), else libpq's default. The messages are libpq's.
//!
//! Not done: libpq's `prefer` also retries without TLS when the TLS
//! handshake itself fails; here `prefer` falls back only when the server
//! answers that it has no TLS. `sslcrl`, `sslcompression`, `sslsni=0` and
//! `ssl_min_protocol_version` are refused as unknown.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use std::error::Error;
use std::fmt::Debug;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};

use openssl::pkey::PKey;
use openssl::ssl::{SslConnector, SslMethod, SslVerifyMode};
use openssl::x509::store::X509StoreBuilder;
use postgres_openssl::{MakeTlsConnector, TlsStream};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_postgres::tls::{MakeTlsConnect, TlsConnect};

/// The conninfo keys this module reads; the rest go to tokio-postgres.
pub const KEYS: &[&str] = &[
    "sslmode",
    "sslrootcert",
    "sslcert",
    "sslkey",
    "sslpassword",
    "sslnegotiation",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Mode {
    Disable,
    Allow,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl Mode {
    fn parse(s: &str) -> Result<Mode, String> {
        Ok(match s {
            "disable" => Mode::Disable,
            "allow" => Mode::Allow,
            "prefer" => Mode::Prefer,
            "require" => Mode::Require,
            "verify-ca" => Mode::VerifyCa,
            "verify-full" => Mode::VerifyFull,
            _ => return Err(format!("invalid sslmode value: \"{s}\" (disable, allow, prefer, require, verify-ca or verify-full)")),
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Mode::Disable => "disable",
            Mode::Allow => "allow",
            Mode::Prefer => "prefer",
            Mode::Require => "require",
            Mode::VerifyCa => "verify-ca",
            Mode::VerifyFull => "verify-full",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Root {
    File(PathBuf),
    /// OpenSSL's default verify paths: the system's trust store.
    System,
}

/// A connection's TLS settings, resolved.
#[derive(Clone)]
pub struct Tls {
    pub mode: Mode,
    /// What the server's chain is verified against; `None`: not verified.
    pub root: Option<Root>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    password: Option<String>,
    pub direct: bool,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls")
            .field("mode", &self.mode)
            .field("root", &self.root)
            .field("cert", &self.cert)
            .field("key", &self.key)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("direct", &self.direct)
            .finish()
    }
}

fn home_file(name: &str) -> Option<PathBuf> {
    let home = std::env::var_os("HOME").filter(|h| !h.is_empty())?;
    Some(Path::new(&home).join(".postgresql").join(name))
}

impl Tls {
    /// The settings from the conninfo's `ssl*` keys (`given`), else the
    /// environment, else libpq's defaults; refused as libpq refuses them.
    pub fn resolve(given: &[(String, String)]) -> Result<Tls, String> {
        let get = |key: &str, var: &str| {
            given
                .iter()
                .rev()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v.clone())
                .or_else(|| std::env::var(var).ok())
                .filter(|v| !v.is_empty())
        };
        let explicit = get("sslmode", "PGSSLMODE")
            .map(|m| Mode::parse(&m))
            .transpose()?;
        let root = match get("sslrootcert", "PGSSLROOTCERT") {
            Some(s) if s == "system" => Some(Root::System),
            Some(s) => Some(Root::File(PathBuf::from(s))),
            None => home_file("root.crt").map(Root::File),
        };
        let mode = match (explicit, &root) {
            (None, Some(Root::System)) => Mode::VerifyFull,
            (Some(m), Some(Root::System)) if m != Mode::VerifyFull && m != Mode::Disable => {
                return Err(format!(
                    "weak sslmode \"{}\" may not be used with sslrootcert=system (use \"verify-full\")",
                    m.name()
                ))
            }
            (m, _) => m.unwrap_or(Mode::Prefer),
        };
        let direct = match get("sslnegotiation", "PGSSLNEGOTIATION").as_deref() {
            None | Some("postgres") => false,
            Some("direct") => true,
            Some(other) => {
                return Err(format!(
                    "invalid sslnegotiation value: \"{other}\" (postgres or direct)"
                ))
            }
        };
        if direct && mode < Mode::Require {
            return Err(format!(
                "weak sslmode \"{}\" may not be used with sslnegotiation=direct (use \"require\", \"verify-ca\", or \"verify-full\")",
                mode.name()
            ));
        }
        // A root file that is not there: verification is off, unless the
        // mode asks for it.
        let root = match root {
            Some(Root::File(p)) if !p.exists() => {
                if mode >= Mode::VerifyCa {
                    return Err(format!(
                        "root certificate file \"{}\" does not exist; either provide the file, use the system's trusted roots with sslrootcert=system, or change sslmode to disable server certificate verification",
                        p.display()
                    ));
                }
                None
            }
            r => r,
        };
        let cert = get("sslcert", "PGSSLCERT")
            .map(PathBuf::from)
            .or_else(|| home_file("postgresql.crt"))
            .filter(|p| p.exists());
        let key = match &cert {
            None => None,
            Some(_) => {
                let key = get("sslkey", "PGSSLKEY")
                    .map(PathBuf::from)
                    .or_else(|| home_file("postgresql.key"))
                    .ok_or("certificate present, but no private key file (set sslkey)")?;
                check_key_file(&key)?;
                Some(key)
            }
        };
        Ok(Tls {
            mode,
            root,
            cert,
            key,
            password: given
                .iter()
                .rev()
                .find(|(k, _)| k == "sslpassword")
                .map(|(_, v)| v.clone()),
            direct,
        })
    }

    /// The connector for tokio-postgres. Where TLS is certain (`require`
    /// or stronger, or a root certificate to verify against) it is built
    /// now, so that a bad file is named before any connection. Under
    /// `prefer` and `allow` it is built when a server first takes TLS:
    /// building one costs OpenSSL's load of the system's trust store, about
    /// 25 ms, which a server without TLS never needs.
    pub fn connector(&self) -> Result<Connector, String> {
        let built = Arc::new(OnceLock::new());
        if self.mode >= Mode::Require || self.root.is_some() || self.direct {
            let _ = built.set(Ok(self.build()?));
        }
        Ok(Connector {
            tls: Arc::new(self.clone()),
            built,
        })
    }

    /// The chain verified when there is a root certificate, against that
    /// root alone; the host name (or IP address) too in verify-full.
    fn build(&self) -> Result<MakeTlsConnector, String> {
        let ssl = |what: &str| {
            let what = what.to_owned();
            move |e: openssl::error::ErrorStack| format!("{what}: {e}")
        };
        let mut b = SslConnector::builder(SslMethod::tls_client()).map_err(ssl("OpenSSL"))?;
        // The builder trusts the system's store; libpq trusts only what
        // sslrootcert names (the system's store only for `system`). Without
        // this, a root file given to pin a private CA would also let in any
        // certificate a public CA signed.
        b.set_cert_store(X509StoreBuilder::new().map_err(ssl("OpenSSL"))?.build());
        match &self.root {
            Some(Root::File(p)) => b.set_ca_file(p).map_err(ssl(&format!(
                "could not read root certificate file \"{}\"",
                p.display()
            )))?,
            Some(Root::System) => b
                .set_default_verify_paths()
                .map_err(ssl("could not load the system's trusted roots"))?,
            None => {}
        }
        b.set_verify(if self.root.is_some() {
            SslVerifyMode::PEER
        } else {
            SslVerifyMode::NONE
        });
        if let (Some(cert), Some(key)) = (&self.cert, &self.key) {
            b.set_certificate_chain_file(cert).map_err(ssl(&format!(
                "could not load the client certificate \"{}\"",
                cert.display()
            )))?;
            let pem = std::fs::read(key).map_err(|e| {
                format!("could not read private key file \"{}\": {e}", key.display())
            })?;
            let pkey = match &self.password {
                Some(pw) => PKey::private_key_from_pem_passphrase(&pem, pw.as_bytes()),
                None => PKey::private_key_from_pem(&pem),
            }
            .map_err(|e| {
                let hint = if self.password.is_none() {
                    " (if it is encrypted, give sslpassword)"
                } else {
                    " (is sslpassword right?)"
                };
                format!(
                    "could not load private key file \"{}\"{hint}: {e}",
                    key.display()
                )
            })?;
            b.set_private_key(&pkey).map_err(ssl("private key"))?;
            b.check_private_key().map_err(ssl(&format!(
                "the private key \"{}\" does not match the certificate \"{}\"",
                key.display(),
                cert.display()
            )))?;
        }
        if self.direct {
            postgres_openssl::set_postgresql_alpn(&mut b).map_err(ssl("ALPN"))?;
        }
        let mut m = MakeTlsConnector::new(b.build());
        let full = self.mode == Mode::VerifyFull;
        m.set_callback(move |c, _host| {
            c.set_verify_hostname(full);
            Ok(())
        });
        Ok(m)
    }

    /// The wire mode tokio-postgres knows: allow is tried as disable first.
    pub fn wire(&self) -> tokio_postgres::config::SslMode {
        use tokio_postgres::config::SslMode;
        match self.mode {
            Mode::Disable | Mode::Allow => SslMode::Disable,
            Mode::Prefer => SslMode::Prefer,
            _ => SslMode::Require,
        }
    }
}

/// libpq's rule for a private key file: u=rw (0600) or less when the
/// current user owns it, u=rw,g=r (0640) or less when root does.
/// tokio-postgres's connector for a connection's settings, built once, at
/// the first TLS handshake if not before (`Tls::connector`).
#[derive(Clone)]
pub struct Connector {
    tls: Arc<Tls>,
    built: Arc<OnceLock<Result<MakeTlsConnector, String>>>,
}

/// One host's handshake, which builds the connector if it is the first.
pub struct Handshake {
    connector: Connector,
    domain: String,
}

type BoxError = Box<dyn Error + Send + Sync>;

impl<S> MakeTlsConnect<S> for Connector
where
    S: AsyncRead + AsyncWrite + Unpin + Debug + Send + Sync + 'static,
{
    type Stream = TlsStream<S>;
    type TlsConnect = Handshake;
    type Error = BoxError;

    fn make_tls_connect(&mut self, domain: &str) -> Result<Handshake, BoxError> {
        Ok(Handshake {
            connector: self.clone(),
            domain: domain.to_owned(),
        })
    }
}

impl<S> TlsConnect<S> for Handshake
where
    S: AsyncRead + AsyncWrite + Unpin + Debug + Send + Sync + 'static,
{
    type Stream = TlsStream<S>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<TlsStream<S>, BoxError>> + Send>>;

    fn connect(self, stream: S) -> Self::Future {
        let c = &self.connector;
        let made = c.built.get_or_init(|| c.tls.build()).clone();
        let handshake = made.map_err(BoxError::from).and_then(|mut m| {
            MakeTlsConnect::<S>::make_tls_connect(&mut m, &self.domain).map_err(BoxError::from)
        });
        match handshake {
            Ok(h) => Box::pin(TlsConnect::connect(h, stream)),
            Err(e) => Box::pin(std::future::ready(Err(e))),
        }
    }
}

fn check_key_file(key: &Path) -> Result<(), String> {
    let meta = std::fs::metadata(key)
        .map_err(|e| format!("could not open private key file \"{}\": {e}", key.display()))?;
    let mode = meta.mode();
    let too_open = if meta.uid() == 0 {
        mode & 0o137 != 0
    } else {
        mode & 0o077 != 0
    };
    if too_open {
        return Err(format!(
            "private key file \"{}\" has group or world access; file must have permissions u=rw (0600) or less if owned by the current user, or permissions u=rw,g=r (0640) or less if owned by root",
            key.display()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn given(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn libpq_refuses_what_libpq_refuses() {
        let e = Tls::resolve(&given(&[("sslmode", "verify-all")])).unwrap_err();
        assert!(e.contains("invalid sslmode value"), "{e}");
        let e =
            Tls::resolve(&given(&[("sslmode", "require"), ("sslrootcert", "system")])).unwrap_err();
        assert!(e.contains("weak sslmode \"require\""), "{e}");
        let e = Tls::resolve(&given(&[
            ("sslmode", "prefer"),
            ("sslnegotiation", "direct"),
        ]))
        .unwrap_err();
        assert!(e.contains("sslnegotiation=direct"), "{e}");
        let e = Tls::resolve(&given(&[
            ("sslmode", "verify-ca"),
            ("sslrootcert", "/nonexistent/root.crt"),
        ]))
        .unwrap_err();
        assert!(e.contains("/nonexistent/root.crt\" does not exist"), "{e}");
    }

    #[test]
    fn system_roots_mean_verify_full_and_a_missing_root_file_means_no_verification() {
        let t = Tls::resolve(&given(&[("sslrootcert", "system")])).unwrap();
        assert_eq!((t.mode, t.root), (Mode::VerifyFull, Some(Root::System)));
        let t = Tls::resolve(&given(&[
            ("sslmode", "require"),
            ("sslrootcert", "/nonexistent/root.crt"),
        ]))
        .unwrap();
        assert_eq!((t.mode, t.root), (Mode::Require, None));
    }

    #[test]
    fn a_key_readable_by_others_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = (dir.path().join("c.crt"), dir.path().join("c.key"));
        std::fs::write(&cert, "").unwrap();
        std::fs::write(&key, "").unwrap();
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
        let pairs = given(&[
            ("sslcert", cert.to_str().unwrap()),
            ("sslkey", key.to_str().unwrap()),
        ]);
        let e = Tls::resolve(&pairs).unwrap_err();
        assert!(e.contains("has group or world access"), "{e}");
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(Tls::resolve(&pairs).is_ok());
    }
}
