//! `broker.kind = "sqs"`: the settings of `[broker]` and the factory the worker's registry holds.

use crate::{
    capabilities, FifoQueues, SqsBroker, SqsConfig, SqsCredentials, DEFAULT_MAX_PAYLOAD,
    SQS_MAX_MESSAGE,
};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use stevedore_core::factory::{
    size_setting, BackendFactory, BackendSetup, ConnectContext, Settings, SettingsError,
};
use stevedore_core::{async_trait, names, Broker, BrokerError, Capabilities};

/// The factory of `broker.kind = "sqs"`. Keys of `[broker]`:
///
/// | key | default | meaning |
/// |---|---|---|
/// | `region` | required | the AWS region, e.g. `"eu-west-1"` |
/// | `endpoint` | AWS's | another endpoint: a local server (`"http://127.0.0.1:9324"`), a VPC endpoint |
/// | `access_key_id`, `secret_access_key`, `session_token` | none | static credentials (set them through `STEVEDORE_BROKER__SECRET_ACCESS_KEY` rather than the file); both or neither |
/// | `instance_metadata` | `false` | without static keys, also ask the EC2 instance-metadata service (on EC2) |
/// | `key_prefix` | `""` | prepended to every SQS queue name |
/// | `queue_urls` | none | table of physical queue name → URL of an existing queue, used as it is |
/// | `fifo` | `false` | every queue is a FIFO queue (`<name>.fifo`) |
/// | `fifo_queues` | `[]` | these logical queues (with their levels and dead letters) are FIFO queues |
/// | `max_payload` | 1 MiB − 16 KiB | largest payload accepted at publish, in bytes (at most 1 MiB); a queue with a smaller `MaximumMessageSize` refuses less |
/// | `timeout` | `"30s"` | longest any SQS call may take, on top of a long poll's wait |
#[derive(Clone, Copy, Debug, Default)]
pub struct SqsFactory;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SqsSettings {
    region: Option<String>,
    endpoint: Option<String>,
    access_key_id: Option<String>,
    secret_access_key: Option<String>,
    session_token: Option<String>,
    instance_metadata: Option<bool>,
    key_prefix: Option<String>,
    queue_urls: Option<BTreeMap<String, String>>,
    fifo: Option<bool>,
    fifo_queues: Option<Vec<String>>,
    max_payload: Option<u64>,
    #[serde(default, with = "humantime_serde::option")]
    timeout: Option<Duration>,
}

#[derive(Debug)]
struct SqsSetup {
    config: SqsConfig,
}

impl BackendFactory for SqsFactory {
    fn kind(&self) -> &'static str {
        "sqs"
    }

    fn keys(&self) -> &'static [&'static str] {
        &[
            "region",
            "endpoint",
            "access_key_id",
            "secret_access_key",
            "session_token",
            "instance_metadata",
            "key_prefix",
            "queue_urls",
            "fifo",
            "fifo_queues",
            "max_payload",
            "timeout",
        ]
    }

    fn configure(&self, settings: &Settings) -> Result<Box<dyn BackendSetup>, SettingsError> {
        let s: SqsSettings = settings.parse()?;
        let region = match s.region {
            Some(r) if !r.trim().is_empty() => r,
            _ => {
                return Err(SettingsError::at(
                    "region",
                    "required for kind = \"sqs\", e.g. region = \"eu-west-1\"",
                ))
            }
        };
        if let Some(ep) = &s.endpoint {
            if !(ep.starts_with("http://") || ep.starts_with("https://")) {
                return Err(SettingsError::at(
                    "endpoint",
                    format!("must start with http:// or https://, got {ep:?}"),
                ));
            }
        }
        let credentials =
            match (s.access_key_id, s.secret_access_key) {
                (Some(id), Some(secret)) if !id.is_empty() && !secret.is_empty() => {
                    SqsCredentials::Static {
                        access_key_id: id,
                        secret_access_key: secret,
                        session_token: s.session_token,
                    }
                }
                (None, None) => SqsCredentials::Chain {
                    instance_metadata: s.instance_metadata.unwrap_or(false),
                },
                (None, Some(_)) => return Err(SettingsError::at(
                    "access_key_id",
                    "access_key_id and secret_access_key go together (or leave both out for the \
                     AWS credential chain)",
                )),
                _ => {
                    return Err(SettingsError::at(
                        "secret_access_key",
                        "access_key_id and secret_access_key go together and must not be empty \
                     (or leave both out for the AWS credential chain)",
                    ))
                }
            };
        let mut config = SqsConfig::new(region, credentials);
        config.endpoint = s.endpoint;
        config.key_prefix = s.key_prefix.unwrap_or_default();
        if !config
            .key_prefix
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(SettingsError::at(
                "key_prefix",
                "may contain only ASCII letters, digits, '-' and '_' (SQS queue names)",
            ));
        }
        for (queue, url) in s.queue_urls.iter().flatten() {
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                return Err(SettingsError::at(
                    format!("queue_urls.{queue}"),
                    format!("must be a queue URL (https://sqs.<region>.amazonaws.com/<account>/<name>), got {url:?}"),
                ));
            }
        }
        config.queue_urls = s.queue_urls.unwrap_or_default();
        let mut fifo = FifoQueues {
            all: s.fifo.unwrap_or(false),
            ..FifoQueues::default()
        };
        for q in s.fifo_queues.unwrap_or_default() {
            if let Err(rule) = names::validate(&q) {
                return Err(SettingsError::at(
                    "fifo_queues",
                    format!("\"{q}\" is not a logical queue name: {rule}"),
                ));
            }
            fifo.queues.insert(q);
        }
        config.fifo = fifo;
        config.max_payload = size_setting("max_payload", s.max_payload, DEFAULT_MAX_PAYLOAD)?;
        if config.max_payload > SQS_MAX_MESSAGE {
            return Err(SettingsError::at(
                "max_payload",
                format!("SQS takes at most {SQS_MAX_MESSAGE} bytes per message"),
            ));
        }
        if let Some(t) = s.timeout {
            if t < Duration::from_secs(1) {
                return Err(SettingsError::at("timeout", "must be at least 1s"));
            }
            config.timeout = t;
        }
        Ok(Box::new(SqsSetup { config }))
    }
}

#[async_trait]
impl BackendSetup for SqsSetup {
    fn capabilities(&self) -> Capabilities {
        capabilities(self.config.max_payload, self.config.fifo.all)
    }

    fn notices(&self) -> Vec<String> {
        let c = &self.config;
        let mut n = vec![format!(
            "sqs: region {}, endpoint {}, credentials {:?}",
            c.region,
            c.endpoint.as_deref().unwrap_or("AWS"),
            c.credentials
        )];
        if c.fifo.all || !c.fifo.queues.is_empty() {
            n.push(
                "sqs: FIFO queues take no per-message delay: delayed jobs and retry backoff on them \
                 wait in a standard <name>-delay queue and are moved in when due"
                    .into(),
            );
        }
        n
    }

    async fn connect(&self, _ctx: &ConnectContext) -> Result<Arc<dyn Broker>, BrokerError> {
        Ok(Arc::new(SqsBroker::connect(self.config.clone()).await?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn configure(
        pairs: &[(&str, serde_json::Value)],
    ) -> Result<Box<dyn BackendSetup>, SettingsError> {
        SqsFactory.configure(&Settings::from_toml_like(pairs.iter().cloned()))
    }

    #[test]
    fn settings_errors_name_the_key() {
        assert_eq!(configure(&[]).unwrap_err().key.as_deref(), Some("region"));
        let e = configure(&[("region", json!("x")), ("access_key_id", json!("a"))]).unwrap_err();
        assert_eq!(e.key.as_deref(), Some("secret_access_key"));
        let e = configure(&[("region", json!("x")), ("endpoint", json!("localhost"))]).unwrap_err();
        assert_eq!(e.key.as_deref(), Some("endpoint"));
        let e =
            configure(&[("region", json!("x")), ("fifo_queues", json!(["a.fifo"]))]).unwrap_err();
        assert_eq!(e.key.as_deref(), Some("fifo_queues"));
        let e =
            configure(&[("region", json!("x")), ("max_payload", json!(2_000_000))]).unwrap_err();
        assert_eq!(e.key.as_deref(), Some("max_payload"));
        let e =
            configure(&[("region", json!("x")), ("queue_urls", json!({"a": "nope"}))]).unwrap_err();
        assert_eq!(e.key.as_deref(), Some("queue_urls.a"));
    }

    #[test]
    fn secrets_stay_out_of_notices() {
        let s = configure(&[
            ("region", json!("eu-west-1")),
            ("access_key_id", json!("AKIAEXAMPLEKEY123")),
            ("secret_access_key", json!("s3cr3t-value")),
            ("fifo", json!(true)),
        ])
        .expect("valid");
        let all = s.notices().join("\n");
        assert!(
            !all.contains("s3cr3t") && !all.contains("EXAMPLEKEY"),
            "{all}"
        );
        assert!(all.contains("FIFO"), "{all}");
        assert!(format!("{s:?}").find("s3cr3t").is_none());
        assert_eq!(
            s.capabilities().delay,
            stevedore_core::DelaySupport::None,
            "FIFO queues take no per-message delay"
        );
    }
}
