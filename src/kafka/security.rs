//! How reentry reaches a Kafka cluster beyond its address: TLS and SASL as
//! librdkafka takes them, from the playbook's `[kafka]` or the `kafka`
//! commands' flags and environment, and any other librdkafka property
//! passed through. Secrets (passwords, key passwords, client secrets,
//! tokens) are used, never shown: `shown()` redacts them.
//!
//! A wrong password or a certificate that does not verify is an answer,
//! not a network blip: librdkafka reports it and then retries forever, so
//! the first use of a secured cluster waits for metadata and stops at the
//! first such report (`probe`), naming the broker and the mechanism.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError as RdError;
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::ClientContext;

pub const PROTOCOLS: &[&str] = &["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"];
pub const MECHANISMS: &[&str] = &["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "OAUTHBEARER"];

/// What a user wrote: the playbook's `[kafka]` keys, or the commands'
/// flags and environment. Values are already expanded (`${VAR}`).
#[derive(Debug, Clone, Default)]
pub struct Settings {
    pub security_protocol: Option<String>,
    pub sasl_mechanism: Option<String>,
    pub sasl_username: Option<String>,
    pub sasl_password: Option<String>,
    pub ssl_ca: Option<String>,
    pub ssl_certificate: Option<String>,
    pub ssl_key: Option<String>,
    pub ssl_key_password: Option<String>,
    /// Any other librdkafka property.
    pub properties: BTreeMap<String, String>,
}

/// librdkafka properties reentry sets itself, per client: a playbook may
/// not change how reentry reads (read_committed, no commits, from EOF).
const OWN: &[&str] = &[
    "bootstrap.servers",
    "metadata.broker.list",
    "group.id",
    "client.id",
    "enable.auto.commit",
    "enable.auto.offset.store",
    "enable.partition.eof",
    "auto.offset.reset",
    "isolation.level",
    "transactional.id",
    "enable.idempotence",
];

/// Properties the typed keys set: `properties` may not say them again.
const TYPED: &[(&str, &str)] = &[
    ("security.protocol", "security-protocol"),
    ("sasl.mechanisms", "sasl-mechanism"),
    ("sasl.mechanism", "sasl-mechanism"),
    ("sasl.username", "sasl-username"),
    ("sasl.password", "sasl-password"),
    ("ssl.ca.location", "ssl-ca"),
    ("ssl.certificate.location", "ssl-certificate"),
    ("ssl.key.location", "ssl-key"),
    ("ssl.key.password", "ssl-key-password"),
];

/// Whether a librdkafka property holds a secret: its value is never shown.
pub fn is_secret(key: &str) -> bool {
    let k = key.to_ascii_lowercase();
    [
        "password",
        "secret",
        "token",
        "jaas",
        "sasl.oauthbearer.config",
        "ssl.key.pem",
        "credential",
    ]
    .iter()
    .any(|s| k.contains(s))
}

/// The librdkafka settings, checked.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Security {
    props: Vec<(String, String)>,
    protocol: String,
    mechanism: Option<String>,
    username: Option<String>,
}

impl std::fmt::Debug for Security {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Security")
            .field("props", &self.shown())
            .finish()
    }
}

impl Security {
    /// Checks the settings; an error names the key (`sasl-password`, or
    /// `properties.KEY`) and says what is wrong.
    pub fn from_settings(s: &Settings) -> Result<Security, String> {
        let protocol = match &s.security_protocol {
            None => "PLAINTEXT".to_owned(),
            Some(p) => {
                let up = p.to_ascii_uppercase();
                if !PROTOCOLS.contains(&up.as_str()) {
                    return Err(format!(
                        "security-protocol: \"{p}\" is not one of {}",
                        PROTOCOLS.join(", ")
                    ));
                }
                up
            }
        };
        let sasl = protocol.starts_with("SASL_");
        let tls = protocol.ends_with("SSL");
        let mechanism = match &s.sasl_mechanism {
            None if sasl => {
                return Err(format!(
                    "sasl-mechanism: {protocol} needs one of {}",
                    MECHANISMS.join(", ")
                ))
            }
            None => None,
            Some(_) if !sasl => {
                return Err(format!(
                    "sasl-mechanism: needs security-protocol SASL_SSL or SASL_PLAINTEXT, not {protocol}"
                ))
            }
            Some(m) => {
                let up = m.to_ascii_uppercase();
                if !MECHANISMS.contains(&up.as_str()) {
                    return Err(format!(
                        "sasl-mechanism: \"{m}\" is not one of {}",
                        MECHANISMS.join(", ")
                    ));
                }
                Some(up)
            }
        };
        let needs_user = matches!(
            mechanism.as_deref(),
            Some("PLAIN" | "SCRAM-SHA-256" | "SCRAM-SHA-512")
        );
        if needs_user && (s.sasl_username.is_none() || s.sasl_password.is_none()) {
            return Err(format!(
                "sasl-username and sasl-password: {} needs both",
                mechanism.as_deref().unwrap_or_default()
            ));
        }
        if !needs_user && (s.sasl_username.is_some() || s.sasl_password.is_some()) {
            return Err(format!(
                "sasl-username: only PLAIN and SCRAM take a user and password{}",
                match &mechanism {
                    Some(m) => format!(", not {m}"),
                    None => String::new(),
                }
            ));
        }
        for (key, value) in [
            ("ssl-ca", &s.ssl_ca),
            ("ssl-certificate", &s.ssl_certificate),
            ("ssl-key", &s.ssl_key),
        ] {
            let Some(path) = value else { continue };
            if !tls {
                return Err(format!(
                    "{key}: needs security-protocol SSL or SASL_SSL, not {protocol}"
                ));
            }
            if !Path::new(path).is_file() {
                return Err(format!("{key}: {path} is not a readable file"));
            }
        }
        if s.ssl_certificate.is_some() != s.ssl_key.is_some() {
            return Err("ssl-certificate and ssl-key: a client certificate needs its key, and a key its certificate".into());
        }
        if s.ssl_key_password.is_some() && s.ssl_key.is_none() {
            return Err("ssl-key-password: there is no ssl-key".into());
        }
        let mut props = vec![(
            "security.protocol".to_owned(),
            protocol.to_ascii_lowercase(),
        )];
        let mut put = |k: &str, v: &Option<String>| {
            if let Some(v) = v {
                props.push((k.to_owned(), v.clone()));
            }
        };
        put("sasl.mechanisms", &mechanism);
        put("sasl.username", &s.sasl_username);
        put("sasl.password", &s.sasl_password);
        put("ssl.ca.location", &s.ssl_ca);
        put("ssl.certificate.location", &s.ssl_certificate);
        put("ssl.key.location", &s.ssl_key);
        put("ssl.key.password", &s.ssl_key_password);
        for (k, v) in &s.properties {
            if OWN.contains(&k.as_str()) {
                return Err(format!(
                    "properties.{k}: reentry sets {k} itself (it reads read_committed, commits nothing, reads to the end)"
                ));
            }
            if let Some((_, typed)) = TYPED.iter().find(|(p, _)| p == k) {
                return Err(format!("properties.{k}: say it with {typed}"));
            }
            props.push((k.clone(), v.clone()));
        }
        // librdkafka rejects an unknown property or value when a client is
        // made: find out now, at the playbook's check, not mid-run.
        let mut c = ClientConfig::new();
        for (k, v) in &props {
            c.set(k, v);
        }
        if let Err(e) = c.create::<BaseConsumer>() {
            let detail = e.to_string();
            let prop = props
                .iter()
                .map(|(k, _)| k.as_str())
                .find(|k| detail.contains(k));
            // A typed setting is named as the playbook writes it.
            let key = match prop {
                Some(k) => match TYPED.iter().find(|(p, _)| *p == k) {
                    Some((_, typed)) => format!("{typed}: "),
                    None => format!("properties.{k}: "),
                },
                None => String::new(),
            };
            let hint = if prop == Some("ssl.key.location") {
                match s.ssl_key_password {
                    None => " (an encrypted key needs ssl-key-password)",
                    Some(_) => " (is ssl-key-password the key's passphrase?)",
                }
            } else {
                ""
            };
            return Err(format!(
                "{key}librdkafka refuses it: {}{hint}",
                redact(&detail, &props)
            ));
        }
        Ok(Security {
            props,
            protocol,
            mechanism,
            username: s.sasl_username.clone(),
        })
    }

    pub fn apply(&self, c: &mut ClientConfig) {
        for (k, v) in &self.props {
            c.set(k, v);
        }
    }

    /// Whether anything beyond plaintext is set: then the first use probes.
    pub fn secured(&self) -> bool {
        self.props.len() > 1 || self.protocol != "PLAINTEXT"
    }

    /// The properties as they may be shown: secrets redacted.
    pub fn shown(&self) -> Vec<(String, String)> {
        self.props
            .iter()
            .map(|(k, v)| {
                let v = if is_secret(k) {
                    "<redacted>".to_owned()
                } else {
                    v.clone()
                };
                (k.clone(), v)
            })
            .collect()
    }

    /// `SASL_SSL, SCRAM-SHA-512 as bob`: for messages.
    pub fn describe(&self) -> String {
        match (&self.mechanism, &self.username) {
            (Some(m), Some(u)) => format!("{}, {m} as {u}", self.protocol),
            (Some(m), None) => format!("{}, {m}", self.protocol),
            _ => self.protocol.clone(),
        }
    }
}

/// Replaces every secret value of `props` found in `text`.
fn redact(text: &str, props: &[(String, String)]) -> String {
    let mut out = text.to_owned();
    for (k, v) in props {
        if is_secret(k) && !v.is_empty() {
            out = out.replace(v.as_str(), "<redacted>");
        }
    }
    out
}

/// Keeps the first error librdkafka reports that no retry will fix.
#[derive(Default)]
struct Watch(Mutex<Option<String>>);

impl ClientContext for Watch {
    fn error(&self, error: RdError, reason: &str) {
        let fatal = matches!(
            error.rdkafka_error_code(),
            Some(
                RDKafkaErrorCode::Authentication
                    | RDKafkaErrorCode::SaslAuthenticationFailed
                    | RDKafkaErrorCode::SSL
                    | RDKafkaErrorCode::UnsupportedSASLMechanism
                    | RDKafkaErrorCode::IllegalSASLState
            )
        );
        // An OpenSSL failure on an established connection (an alert from
        // the broker: a client certificate it wants and did not get, or
        // does not trust) comes as a transport failure; no retry fixes it.
        let fatal = fatal || reason.contains("SSL routines");
        if fatal {
            let mut slot = self.0.lock().unwrap_or_else(|e| e.into_inner());
            slot.get_or_insert_with(|| reason.to_owned());
        }
    }

    fn log(&self, _level: rdkafka::config::RDKafkaLogLevel, _fac: &str, _log_message: &str) {}
}

impl rdkafka::consumer::ConsumerContext for Watch {}

/// Waits for the cluster's metadata through `config`, up to `timeout`, and
/// stops at the first authentication or TLS failure, with librdkafka's
/// reason (secrets redacted).
pub fn probe(config: &ClientConfig, security: &Security, timeout: Duration) -> Result<(), String> {
    // No log events: each failure queues one before its error event, and
    // a poll that serves a log returns nothing, as an empty queue does.
    let mut config = config.clone();
    config.set_log_level(rdkafka::config::RDKafkaLogLevel::Emerg);
    let c: BaseConsumer<Watch> = config
        .create_with_context(Watch::default())
        .map_err(|e| e.to_string())?;
    let deadline = Instant::now() + timeout;
    loop {
        let got = c.fetch_metadata(None, Duration::from_millis(500));
        // Errors are events: polling serves them to `Watch`, one a poll.
        // Every queued one is served: under load a failed connection
        // queues several a second (transport failures, all brokers down)
        // and one a fetch left the TLS or SASL failure behind them for
        // longer than the timeout.
        if got.is_err() {
            for _ in 0..1000 {
                if c.poll(Duration::ZERO).is_none() {
                    break;
                }
            }
        }
        let fatal = c
            .context()
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(reason) = fatal {
            let certless = !security
                .props
                .iter()
                .any(|(k, _)| k == "ssl.certificate.location");
            let hint = if certless
                && (reason.contains("alert bad certificate")
                    || reason.contains("certificate required"))
            {
                " (the broker asks for a client certificate: give ssl-certificate and ssl-key)"
            } else {
                ""
            };
            return Err(format!(
                "{} refused: {}{hint}",
                security.describe(),
                redact(&reason, &security.props)
            ));
        }
        match got {
            Ok(_) => return Ok(()),
            Err(e) if Instant::now() >= deadline => {
                return Err(format!(
                    "no metadata within {}s over {}: {}",
                    timeout.as_secs(),
                    security.describe(),
                    redact(&e.to_string(), &security.props)
                ))
            }
            Err(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(f: impl FnOnce(&mut Settings)) -> Settings {
        let mut s = Settings::default();
        f(&mut s);
        s
    }

    #[test]
    fn each_wrong_combination_names_its_key() {
        let cases: Vec<(Settings, &str)> = vec![
            (
                settings(|s| s.security_protocol = Some("TLS".into())),
                "security-protocol: \"TLS\"",
            ),
            (
                settings(|s| s.security_protocol = Some("SASL_SSL".into())),
                "sasl-mechanism: SASL_SSL needs",
            ),
            (
                settings(|s| {
                    s.security_protocol = Some("SASL_SSL".into());
                    s.sasl_mechanism = Some("SCRAM-SHA-512".into());
                    s.sasl_username = Some("bob".into());
                }),
                "sasl-username and sasl-password",
            ),
            (
                settings(|s| s.sasl_mechanism = Some("PLAIN".into())),
                "needs security-protocol SASL_SSL",
            ),
            (
                settings(|s| s.ssl_ca = Some("/etc/hostname".into())),
                "ssl-ca: needs security-protocol SSL",
            ),
            (
                settings(|s| {
                    s.security_protocol = Some("SSL".into());
                    s.ssl_ca = Some("/nonexistent/ca.pem".into());
                }),
                "ssl-ca: /nonexistent/ca.pem is not a readable file",
            ),
            (
                settings(|s| {
                    s.properties
                        .insert("isolation.level".into(), "read_uncommitted".into());
                }),
                "properties.isolation.level: reentry sets",
            ),
            (
                settings(|s| {
                    s.properties.insert("sasl.password".into(), "x".into());
                }),
                "properties.sasl.password: say it with sasl-password",
            ),
            (
                settings(|s| {
                    s.properties.insert("no.such.property".into(), "1".into());
                }),
                "properties.no.such.property: librdkafka refuses it",
            ),
        ];
        for (s, want) in cases {
            let e = Security::from_settings(&s).unwrap_err();
            assert!(e.contains(want), "{want}: {e}");
        }
    }

    #[test]
    fn secrets_are_used_and_never_shown() {
        let s = Security::from_settings(&settings(|s| {
            s.security_protocol = Some("sasl_ssl".into());
            s.sasl_mechanism = Some("scram-sha-512".into());
            s.sasl_username = Some("bob".into());
            s.sasl_password = Some("hunter2".into());
            s.properties
                .insert("sasl.oauthbearer.client.secret".into(), "s3".into());
        }))
        .unwrap();
        let mut c = ClientConfig::new();
        s.apply(&mut c);
        assert_eq!(c.get("sasl.password"), Some("hunter2"));
        assert_eq!(c.get("security.protocol"), Some("sasl_ssl"));
        let shown = format!("{:?} {:?}", s, s.shown());
        assert!(
            !shown.contains("hunter2") && !shown.contains("\"s3\""),
            "{shown}"
        );
        assert_eq!(s.describe(), "SASL_SSL, SCRAM-SHA-512 as bob");
    }
}
