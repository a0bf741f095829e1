//! # stevedore-sqs
//!
//! Amazon SQS backend for Stevedore (`broker.kind = "sqs"`), on standard and FIFO queues,
//! through the official `aws-sdk-sqs`.
//!
//! | Stevedore | SQS |
//! |---|---|
//! | physical queue (each priority level, the dead letters) | one SQS queue named `key_prefix` + name (+ `.fifo`), created idempotently with 14 days' retention, or an existing URL from `queue_urls` |
//! | publish | `SendMessageBatch`, 10 per call, split so no call exceeds the queue's `MaximumMessageSize` (read from the queue, attributes counted) |
//! | receive | `ReceiveMessage` with long polling (`WaitTimeSeconds` ≤ 20) and `VisibilityTimeout` = the lease, under an operation timeout so a long poll can never hang |
//! | receipt | the receipt handle plus the lease's end as this process saw it |
//! | ack / release / extend | `DeleteMessageBatch` / `ChangeMessageVisibilityBatch` to 0 / `ChangeMessageVisibility`, refused past SQS's 12 h cap before it is reached |
//! | delivery count | `ApproximateReceiveCount` |
//! | per-key order (FIFO) | the job key is the `MessageGroupId`; one message of a group is handed out at a time, the others of the same receive are held (still invisible) until it is settled (`fifo` module) |
//! | delay | standard queues: `DelaySeconds` up to 900 s, the runtime hops beyond; FIFO queues take no per-message delay, so delayed messages wait durably in a standard companion queue (`<name>-delay`) and a promoter moves them into the FIFO queue when due |
//! | depth | `ApproximateNumberOfMessages`, `…NotVisible`, `…Delayed` (SQS says these are approximate and may lag about a minute) |
//! | browse | not supported: `dlq list` receives and releases instead |
//!
//! A delete with a receipt whose visibility has ended succeeds on SQS without deleting anything,
//! so the backend keeps each lease's end itself (measured from *before* the receive was sent,
//! so it never outlives SQS's own) and answers [`BrokerError::LeaseLost`] for it without sending.
//!
//! Headers, binary bodies and foreign messages: see the `wire` module docs (`stevedore`
//! attribute, base64 bodies, at most 9 application headers).
//!
//! Credentials never reach logs. Without static credentials in the config the backend uses the
//! environment, the shared profile files, web identity and the ECS container endpoint, and only
//! with `instance_metadata = true` the EC2 instance-metadata service, so a laptop or CI run
//! never calls 169.254.169.254.

mod delay;
mod factory;
mod fifo;
mod wire;

pub use factory::SqsFactory;

use async_trait::async_trait;
use aws_sdk_sqs::config::http::HttpResponse;
use aws_sdk_sqs::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_sqs::types::{
    ChangeMessageVisibilityBatchRequestEntry, DeleteMessageBatchRequestEntry,
    MessageSystemAttributeName, QueueAttributeName, SendMessageBatchRequestEntry,
};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};
use stevedore_core::{
    Broker, BrokerError, Capabilities, DelayStore, DelaySupport, Delivery, Depth, Envelope,
    LeaseSupport, OrderingSupport, Receipt, ReceiveOptions,
};

/// SQS's largest message, attributes included (1 MiB). Queues created with an older setting
/// may allow less: the backend reads each queue's `MaximumMessageSize`.
pub const SQS_MAX_MESSAGE: usize = 1024 * 1024;
/// Room kept for attributes within [`SQS_MAX_MESSAGE`] when declaring `max_payload`.
const ATTRIBUTE_ROOM: usize = 16 * 1024;
/// The default `max_payload`: a text payload of this size always fits a 1 MiB queue.
pub const DEFAULT_MAX_PAYLOAD: usize = SQS_MAX_MESSAGE - ATTRIBUTE_ROOM;
/// The longest native delay (`DelaySeconds`).
pub const MAX_DELAY: Duration = Duration::from_secs(900);
/// The longest a message may stay invisible after it was received.
pub const MAX_VISIBILITY: Duration = Duration::from_secs(12 * 3600);
/// The longest long poll SQS allows.
const MAX_WAIT: Duration = Duration::from_secs(20);
/// Messages kept this long on queues the backend creates (SQS's maximum; its default is 4 days).
const RETENTION_SECS: &str = "1209600";

/// Which queues are FIFO queues.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FifoQueues {
    /// Every queue of this broker.
    pub all: bool,
    /// These logical queues (with their levels and dead letters).
    pub queues: BTreeSet<String>,
}

impl FifoQueues {
    /// Whether physical queue `physical` is FIFO.
    pub fn is_fifo(&self, physical: &str) -> bool {
        self.all || self.queues.contains(logical(physical))
    }
}

/// The logical queue of a physical one (`emails__high` → `emails`).
fn logical(physical: &str) -> &str {
    physical.split_once("__").map_or(physical, |(l, _)| l)
}

/// How the backend finds credentials.
#[derive(Clone, PartialEq, Eq)]
pub enum SqsCredentials {
    /// Keys given in the config (or its environment overrides).
    Static {
        /// `AKIA…`
        access_key_id: String,
        /// The secret; never shown.
        secret_access_key: String,
        /// For temporary credentials.
        session_token: Option<String>,
    },
    /// The AWS chain: environment, profile files, web identity, ECS container endpoint, and the
    /// EC2 instance-metadata service only when `instance_metadata` is true.
    Chain {
        /// Whether to ask the EC2 instance-metadata service (169.254.169.254) last.
        instance_metadata: bool,
    },
}

impl fmt::Debug for SqsCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SqsCredentials::Static { access_key_id, .. } => {
                write!(f, "Static({}, secret redacted)", redact_key(access_key_id))
            }
            SqsCredentials::Chain { instance_metadata } => {
                write!(f, "Chain(instance_metadata: {instance_metadata})")
            }
        }
    }
}

/// An access key id as logs show it: its first 4 and last 4 characters.
fn redact_key(key: &str) -> String {
    if key.len() <= 8 {
        return "****".into();
    }
    format!("{}…{}", &key[..4], &key[key.len() - 4..])
}

/// Connection settings. See [`SqsFactory`] for the `[broker]` keys they come from.
#[derive(Clone, Debug)]
pub struct SqsConfig {
    /// The AWS region (`us-east-1`).
    pub region: String,
    /// An endpoint other than AWS's (a local server, a VPC endpoint).
    pub endpoint: Option<String>,
    /// Where credentials come from.
    pub credentials: SqsCredentials,
    /// Prepended to every queue name the backend creates or looks up.
    pub key_prefix: String,
    /// Existing queues by physical queue name, used instead of looking names up.
    pub queue_urls: BTreeMap<String, String>,
    /// Which queues are FIFO.
    pub fifo: FifoQueues,
    /// Largest payload accepted at publish, in bytes.
    pub max_payload: usize,
    /// Longest any call but a long poll may take (a long poll gets its wait on top).
    pub timeout: Duration,
}

impl SqsConfig {
    /// Settings for `region` with static credentials, everything else default.
    pub fn new(region: impl Into<String>, credentials: SqsCredentials) -> Self {
        SqsConfig {
            region: region.into(),
            endpoint: None,
            credentials,
            key_prefix: String::new(),
            queue_urls: BTreeMap::new(),
            fifo: FifoQueues::default(),
            max_payload: DEFAULT_MAX_PAYLOAD,
            timeout: Duration::from_secs(30),
        }
    }
}

/// What standard and FIFO queues do, for `max_payload`.
pub fn capabilities(max_payload: usize, fifo: bool) -> Capabilities {
    Capabilities {
        delay: if fifo {
            DelaySupport::None
        } else {
            DelaySupport::Native {
                max: Some(MAX_DELAY),
            }
        },
        lease: LeaseSupport::Timed {
            max: Some(MAX_VISIBILITY),
        },
        // FIFO: the message group is the job key, and the backend hands out one message of a
        // group at a time (the `fifo` module), so the next of a key never starts while the one
        // before it runs.
        ordering: if fifo {
            OrderingSupport::PerKey
        } else {
            OrderingSupport::None
        },
        max_payload,
        max_batch: 10,
        durable: true,
        // Standard: SQS makes a delayed message visible within about a second of its time, and
        // a waiting long poll sees it at once. FIFO: the promoter's pass on top.
        delay_tolerance: if fifo {
            Duration::from_secs(4)
        } else {
            Duration::from_secs(2)
        },
        depth_staleness: Duration::from_secs(60),
        max_headers: Some(wire::MAX_ATTRIBUTES - 1),
        shared: true,
        counts_deliveries: true,
        uncounted_release: !fifo,
        sharing: stevedore_core::Sharing::Any,
    }
}

/// One SQS queue the backend knows.
#[derive(Debug)]
struct QueueInfo {
    url: String,
    /// Its `MaximumMessageSize`.
    max_size: usize,
    fifo: bool,
    /// FIFO queues: the standard queue delayed messages wait in.
    delay_url: Option<String>,
}

/// What a receipt holds: the queue URL, the receipt handle, and the lease as this process saw it.
struct Token {
    url: Arc<str>,
    handle: String,
    received: Instant,
    /// When the lease ends; set to `received` once acked or released.
    until: Mutex<Instant>,
    /// FIFO queues: the message's group and where what came behind it is held.
    member: Option<fifo::Member>,
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let tail = &self.handle[self.handle.len().saturating_sub(12)..];
        write!(f, "…{tail}")
    }
}

impl Token {
    fn until(&self) -> Instant {
        *self.until.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn set_until(&self, t: Instant) {
        *self.until.lock().unwrap_or_else(|e| e.into_inner()) = t;
    }

    fn live(&self, now: Instant) -> bool {
        self.until() > now
    }
}

/// The SQS broker. Cheap to clone (clones share the client and queue cache); thread safe.
#[derive(Clone)]
pub struct SqsBroker {
    inner: Arc<Inner>,
}

struct Inner {
    client: aws_sdk_sqs::Client,
    config: SqsConfig,
    standard: Capabilities,
    fifo: Capabilities,
    queues: Mutex<HashMap<String, Arc<QueueInfo>>>,
    /// FIFO queues: messages held behind the one of their group handed out, per physical queue.
    holds: Mutex<HashMap<String, Arc<fifo::Hold>>>,
    closed: AtomicBool,
}

impl fmt::Debug for SqsBroker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqsBroker")
            .field("region", &self.inner.config.region)
            .field("endpoint", &self.inner.config.endpoint)
            .field("credentials", &self.inner.config.credentials)
            .finish_non_exhaustive()
    }
}

/// Whether SQS's error code says a receipt handle no longer holds the message.
fn receipt_gone(code: &str) -> bool {
    code.contains("ReceiptHandleIsInvalid")
        || code.contains("InvalidParameterValue")
        || code.contains("MessageNotInflight")
}

fn now_ms() -> u64 {
    stevedore_core::to_millis(SystemTime::now())
}

/// What a missing-queue error says.
const MISSING_QUEUE: &str = "the SQS queue does not exist";

/// Whole seconds, rounded up, within `lo..=hi`.
fn ceil_secs(d: Duration, lo: i32, hi: i32) -> i32 {
    let s = d.as_secs() + u64::from(d.subsec_nanos() > 0);
    i32::try_from(s).unwrap_or(i32::MAX).clamp(lo, hi)
}

/// Maps an SDK failure onto the runtime's errors: timeouts, unreachable endpoints, throttling and
/// 5xx are transient; a missing queue and refused credentials are permanent and say which
/// setting to look at. Never includes credentials.
/// Where a credentials error sends the operator.
const CREDENTIALS_HINT: &str = "(check broker.access_key_id, broker.secret_access_key and \
     broker.region, or the AWS credential chain)";

/// The HTTP status of a response the SDK got, if it got one.
fn raw_status<E>(e: &SdkError<E, HttpResponse>) -> Option<u16> {
    match e {
        SdkError::ServiceError(s) => Some(s.raw().status().as_u16()),
        SdkError::ResponseError(r) => Some(r.raw().status().as_u16()),
        _ => None,
    }
}

fn sdk_error<E>(op: &str, queue: &str, e: SdkError<E, HttpResponse>) -> BrokerError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    match &e {
        SdkError::TimeoutError(_) => return BrokerError::Timeout(Duration::ZERO),
        SdkError::DispatchFailure(d) => {
            return BrokerError::Connection(format!(
                "{op} {queue}: cannot reach the SQS endpoint ({})",
                if d.is_timeout() {
                    "connect timed out".to_string()
                } else {
                    format!("{:?}", d.as_connector_error().map(|c| c.to_string()))
                }
            ))
        }
        SdkError::ResponseError(_) => {
            return BrokerError::transient(format!("{op} {queue}: unreadable SQS response"))
        }
        _ => {}
    }
    let code = e.code().unwrap_or("").to_string();
    let message = e.message().unwrap_or("").to_string();
    // An error body the SDK cannot read (a proxy's, or an emulator answering in XML) still has
    // its HTTP status: 401 and 403 are the credentials.
    let status = raw_status(&e);
    let text = if code.is_empty() {
        format!("{op} {queue}: SQS answered HTTP {}", status.unwrap_or(0))
    } else {
        format!("{op} {queue}: SQS said {code}: {message}")
    };
    let denied = code.is_empty() && matches!(status, Some(401 | 403));
    match code.as_str() {
        _ if denied => BrokerError::permanent(format!("{text} {CREDENTIALS_HINT}")),
        "AWS.SimpleQueueService.NonExistentQueue" | "QueueDoesNotExist" => {
            // Transient: the queue is looked up (or created) again on the next call.
            BrokerError::transient(format!(
                "{op} {queue}: {MISSING_QUEUE} (it is created again on the next call unless \
                 broker.queue_urls names it; check broker.key_prefix and broker.queue_urls)"
            ))
        }
        "InvalidClientTokenId"
        | "SignatureDoesNotMatch"
        | "UnrecognizedClientException"
        | "InvalidSecurity"
        | "MissingAuthenticationToken"
        | "AccessDenied"
        | "AccessDeniedException"
        | "ExpiredToken" => BrokerError::permanent(format!("{text} {CREDENTIALS_HINT}")),
        "ThrottlingException"
        | "RequestThrottled"
        | "ServiceUnavailable"
        | "InternalError"
        | "InternalFailure"
        | "KmsThrottled"
        | "AWS.SimpleQueueService.KmsThrottled" => BrokerError::transient(text),
        _ if code.is_empty() => BrokerError::transient(text),
        _ => BrokerError::permanent(text),
    }
}

impl SqsBroker {
    /// Builds the client. Makes no call to SQS: the first call that needs a queue looks it up
    /// (or creates it). Never reaches the EC2 instance-metadata service unless the config asks.
    pub async fn connect(config: SqsConfig) -> Result<Self, BrokerError> {
        use aws_config::timeout::TimeoutConfig;
        use aws_config::{BehaviorVersion, Region};
        let timeouts = TimeoutConfig::builder()
            .connect_timeout(Duration::from_secs(5))
            // One attempt of a long poll waits up to 20 s; no attempt may hang past this.
            .operation_attempt_timeout(config.timeout.max(MAX_WAIT + Duration::from_secs(10)))
            .build();
        let mut loader = aws_config::defaults(BehaviorVersion::latest())
            .region(Region::new(config.region.clone()))
            .timeout_config(timeouts)
            .retry_config(aws_config::retry::RetryConfig::standard().with_max_attempts(3));
        if let Some(ep) = &config.endpoint {
            loader = loader.endpoint_url(ep);
        }
        loader = match &config.credentials {
            SqsCredentials::Static {
                access_key_id,
                secret_access_key,
                session_token,
            } => loader.credentials_provider(aws_credential_types::Credentials::new(
                access_key_id,
                secret_access_key,
                session_token.clone(),
                None,
                "stevedore-config",
            )),
            SqsCredentials::Chain {
                instance_metadata: true,
            } => loader,
            SqsCredentials::Chain {
                instance_metadata: false,
            } => {
                use aws_config::meta::credentials::CredentialsProviderChain;
                let region = Region::new(config.region.clone());
                let chain = CredentialsProviderChain::first_try(
                    "Environment",
                    aws_config::environment::EnvironmentVariableCredentialsProvider::new(),
                )
                .or_else(
                    "Profile",
                    aws_config::profile::ProfileFileCredentialsProvider::builder().build(),
                )
                .or_else(
                    "WebIdentityToken",
                    aws_config::web_identity_token::WebIdentityTokenCredentialsProvider::builder()
                        .configure(
                            &aws_config::provider_config::ProviderConfig::default()
                                .with_region(Some(region)),
                        )
                        .build(),
                )
                .or_else(
                    "EcsContainer",
                    aws_config::ecs::EcsCredentialsProvider::builder().build(),
                );
                loader.credentials_provider(chain)
            }
        };
        let sdk = loader.load().await;
        let client = aws_sdk_sqs::Client::new(&sdk);
        Ok(SqsBroker {
            inner: Arc::new(Inner {
                client,
                standard: capabilities(config.max_payload, config.fifo.all),
                fifo: capabilities(config.max_payload, true),
                config,
                queues: Mutex::new(HashMap::new()),
                holds: Mutex::new(HashMap::new()),
                closed: AtomicBool::new(false),
            }),
        })
    }

    fn check_open(&self) -> Result<(), BrokerError> {
        if self.inner.closed.load(Ordering::Acquire) {
            Err(BrokerError::Closed)
        } else {
            Ok(())
        }
    }

    /// The SQS name of physical queue `physical`.
    fn sqs_name(&self, physical: &str) -> Result<String, BrokerError> {
        let fifo = self.inner.config.fifo.is_fifo(physical);
        let name = format!(
            "{}{physical}{}",
            self.inner.config.key_prefix,
            if fifo { ".fifo" } else { "" }
        );
        let base = name.strip_suffix(".fifo").unwrap_or(&name);
        if name.len() > 80
            || base.is_empty()
            || !base
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(BrokerError::InvalidQueue {
                queue: physical.to_string(),
                reason: format!(
                    "SQS queue name {name:?} must be 1 to 80 ASCII letters, digits, '-' and '_' \
                     (with its broker.key_prefix and a .fifo suffix)"
                ),
            });
        }
        Ok(name)
    }

    /// The queue's URL and limits: cached, else from `queue_urls`, else looked up, else created.
    async fn queue(&self, physical: &str) -> Result<Arc<QueueInfo>, BrokerError> {
        if let Some(q) = self.cached(physical) {
            return Ok(q);
        }
        let fifo = self.inner.config.fifo.is_fifo(physical);
        let configured = self.inner.config.queue_urls.get(physical);
        let url = match configured {
            Some(url) => url.clone(),
            None => self.create(&self.sqs_name(physical)?, fifo).await?,
        };
        let max_size = match self.max_size(&url, physical).await {
            // A queue the config names is never created, so waiting cannot help.
            Err(e) if configured.is_some() && e.to_string().contains(MISSING_QUEUE) => {
                return Err(BrokerError::permanent(format!(
                    "queue {physical}: broker.queue_urls.{physical} = {url:?}, but \
                     {MISSING_QUEUE} (check the URL, its region and account; Stevedore creates \
                     only the queues it names itself)"
                )));
            }
            got => got?,
        };
        let delay_url = if fifo {
            let name = format!(
                "{}-delay",
                self.sqs_name(physical)?.trim_end_matches(".fifo")
            );
            if name.len() > 80 {
                return Err(BrokerError::InvalidQueue {
                    queue: physical.to_string(),
                    reason: format!(
                        "the FIFO queue's delay queue {name:?} would exceed SQS's 80 characters"
                    ),
                });
            }
            Some(self.create(&name, false).await?)
        } else {
            None
        };
        let info = Arc::new(QueueInfo {
            url,
            max_size,
            fifo,
            delay_url,
        });
        self.inner
            .queues
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(physical.to_string(), info.clone());
        Ok(info)
    }

    /// Drops a queue from the cache after SQS said it does not exist (deleted, or a local
    /// server restarted empty), so the next call looks it up or creates it again.
    fn forget_if_missing(&self, physical: &str, e: BrokerError) -> BrokerError {
        if e.to_string().contains(MISSING_QUEUE) {
            self.inner
                .queues
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(physical);
        }
        e
    }

    fn cached(&self, physical: &str) -> Option<Arc<QueueInfo>> {
        self.inner
            .queues
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(physical)
            .cloned()
    }

    fn known_fifo(&self) -> Vec<(String, Arc<QueueInfo>)> {
        self.inner
            .queues
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|(_, q)| q.fifo)
            .map(|(k, q)| (k.clone(), q.clone()))
            .collect()
    }

    /// CreateQueue, idempotent; an existing queue with other attributes is looked up instead.
    async fn create(&self, name: &str, fifo: bool) -> Result<String, BrokerError> {
        let mut req = self
            .inner
            .client
            .create_queue()
            .queue_name(name)
            .attributes(QueueAttributeName::MessageRetentionPeriod, RETENTION_SECS);
        if fifo {
            req = req.attributes(QueueAttributeName::FifoQueue, "true");
        }
        match req.send().await {
            Ok(out) => out
                .queue_url
                .ok_or_else(|| BrokerError::transient(format!("CreateQueue {name}: no URL"))),
            Err(e)
                if matches!(
                    e.code(),
                    Some(
                        "QueueAlreadyExists"
                            | "QueueNameExists"
                            | "AWS.SimpleQueueService.QueueNameExists"
                    )
                ) =>
            {
                let out = self
                    .inner
                    .client
                    .get_queue_url()
                    .queue_name(name)
                    .send()
                    .await
                    .map_err(|e| sdk_error("GetQueueUrl", name, e))?;
                out.queue_url
                    .ok_or_else(|| BrokerError::transient(format!("GetQueueUrl {name}: no URL")))
            }
            Err(e) => Err(sdk_error("CreateQueue", name, e)),
        }
    }

    async fn max_size(&self, url: &str, physical: &str) -> Result<usize, BrokerError> {
        let out = self
            .inner
            .client
            .get_queue_attributes()
            .queue_url(url)
            .attribute_names(QueueAttributeName::MaximumMessageSize)
            .send()
            .await
            .map_err(|e| sdk_error("GetQueueAttributes", physical, e))?;
        Ok(out
            .attributes
            .and_then(|a| a.get(&QueueAttributeName::MaximumMessageSize).cloned())
            .and_then(|v| v.parse().ok())
            .unwrap_or(SQS_MAX_MESSAGE))
    }

    /// Sends `messages` to `url`, in batches of 10 within `max_size` in total. `delay` gives each
    /// message's `DelaySeconds` (standard queues only); FIFO queues get group and dedup ids.
    async fn send(
        &self,
        physical: &str,
        url: &str,
        max_size: usize,
        fifo: bool,
        messages: &[Envelope],
    ) -> Result<(), BrokerError> {
        let now = SystemTime::now();
        let sent_ms = now_ms();
        let mut batch: Vec<SendMessageBatchRequestEntry> = Vec::new();
        let mut batch_size = 0;
        for (i, env) in messages.iter().enumerate() {
            let out = wire::encode(env);
            if out.size > max_size || env.payload.len() > self.inner.config.max_payload {
                let over = wire::overhead(env, &out);
                return Err(BrokerError::PayloadTooLarge {
                    size: env.payload.len(),
                    max: max_size
                        .saturating_sub(over)
                        .min(self.inner.config.max_payload),
                    backend: "sqs",
                });
            }
            if batch.len() == 10 || (batch_size + out.size > max_size && !batch.is_empty()) {
                self.send_batch(physical, url, std::mem::take(&mut batch))
                    .await?;
                batch_size = 0;
            }
            batch_size += out.size;
            let mut entry = SendMessageBatchRequestEntry::builder()
                .id(i.to_string())
                .message_body(out.body)
                .set_message_attributes(Some(out.attributes));
            if fifo {
                entry = entry
                    .message_group_id(wire::group_id(env))
                    .message_deduplication_id(wire::dedup_id(env, sent_ms));
            } else if let Some(d) = env.delay_remaining(now) {
                entry = entry.delay_seconds(ceil_secs(d, 0, MAX_DELAY.as_secs() as i32));
            }
            batch.push(
                entry
                    .build()
                    .map_err(|e| BrokerError::permanent(format!("SendMessageBatch entry: {e}")))?,
            );
        }
        if !batch.is_empty() {
            self.send_batch(physical, url, batch).await?;
        }
        Ok(())
    }

    /// One SendMessageBatch; entries SQS failed on its side are sent again (up to 3 times), an
    /// entry refused as the sender's fault fails the call with SQS's reason.
    async fn send_batch(
        &self,
        physical: &str,
        url: &str,
        mut entries: Vec<SendMessageBatchRequestEntry>,
    ) -> Result<(), BrokerError> {
        for round in 0.. {
            let out = self
                .inner
                .client
                .send_message_batch()
                .queue_url(url)
                .set_entries(Some(entries.clone()))
                .send()
                .await
                .map_err(|e| {
                    self.forget_if_missing(physical, sdk_error("SendMessageBatch", physical, e))
                })?;
            if out.failed.is_empty() {
                return Ok(());
            }
            if let Some(f) = out.failed.iter().find(|f| f.sender_fault) {
                return Err(BrokerError::permanent(format!(
                    "SendMessageBatch {physical}: SQS refused a message: {}: {}",
                    f.code,
                    f.message.as_deref().unwrap_or("")
                )));
            }
            if round >= 2 {
                return Err(BrokerError::transient(format!(
                    "SendMessageBatch {physical}: {} messages failed on SQS's side 3 times ({})",
                    out.failed.len(),
                    out.failed[0].code
                )));
            }
            let failed: BTreeSet<&str> = out.failed.iter().map(|f| f.id.as_str()).collect();
            entries.retain(|e| failed.contains(e.id()));
            tokio::time::sleep(Duration::from_millis(100 << round)).await;
        }
        Ok(())
    }

    fn tokens(receipts: &[Receipt]) -> (Vec<(&Receipt, &Token)>, Option<String>) {
        let mut lost = None;
        let mut live = Vec::new();
        let now = Instant::now();
        for r in receipts {
            match r.token::<Token>() {
                Some(t) if t.live(now) => live.push((r, t)),
                _ => lost = Some(r.queue().to_string()),
            }
        }
        (live, lost)
    }

    /// Acks or releases `receipts`. On FIFO queues, what is held behind a released message (or
    /// one whose lease is over) goes back with it, so SQS delivers its group again in order, and
    /// a settled message frees its group for the next one.
    async fn settle(&self, receipts: &[Receipt], release: bool) -> Result<(), BrokerError> {
        self.check_open()?;
        let now = Instant::now();
        let mut behind: Vec<Receipt> = Vec::new();
        for r in receipts {
            if let Some((hold, group, handle)) = fifo::member_of(r) {
                let over = r.token::<Token>().is_some_and(|t| !t.live(now));
                if release || over {
                    behind.extend(hold.take_behind(group, handle));
                }
            }
        }
        let result = self.settle_batches(receipts, release).await;
        if !behind.is_empty() {
            if let Err(e) = self.settle_batches(&behind, true).await {
                tracing::debug!(error = %e, "releasing held FIFO messages");
            }
        }
        let now = Instant::now();
        for r in receipts {
            if let (Some((hold, group, handle)), Some(t)) = (fifo::member_of(r), r.token::<Token>())
            {
                // Settled or lost; one whose settle failed on SQS's side still holds its group.
                if !t.live(now) {
                    hold.free(group, handle);
                }
            }
        }
        result
    }

    /// `ChangeMessageVisibilityBatch` of at most 10 receipts of one queue URL to `secs`; returns
    /// the positions SQS refused, with SQS's codes.
    async fn visibility_batch(
        &self,
        url: &str,
        queue: &str,
        tokens: &[&Token],
        secs: i32,
    ) -> Result<Vec<(usize, String)>, BrokerError> {
        let entries = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| {
                ChangeMessageVisibilityBatchRequestEntry::builder()
                    .id(i.to_string())
                    .receipt_handle(&t.handle)
                    .visibility_timeout(secs)
                    .build()
                    .map_err(|e| BrokerError::permanent(e.to_string()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let out = self
            .inner
            .client
            .change_message_visibility_batch()
            .queue_url(url)
            .set_entries(Some(entries))
            .send()
            .await
            .map_err(|e| sdk_error("ChangeMessageVisibilityBatch", queue, e))?;
        Ok(out
            .failed
            .into_iter()
            .filter_map(|f| Some((f.id.parse().ok()?, f.code)))
            .collect())
    }

    /// Runs a delete or visibility-0 batch per queue URL, 10 at a time; returns the queue of a
    /// receipt SQS said was no longer valid.
    async fn settle_batches(&self, receipts: &[Receipt], release: bool) -> Result<(), BrokerError> {
        let (live, mut lost) = Self::tokens(receipts);
        let mut by_url: BTreeMap<&str, Vec<(&Receipt, &Token)>> = BTreeMap::new();
        for (r, t) in live {
            by_url.entry(&t.url).or_default().push((r, t));
        }
        for (url, all) in by_url {
            for chunk in all.chunks(10) {
                let queue = chunk[0].0.queue();
                let failed: Vec<(usize, String)> = if release {
                    let tokens: Vec<&Token> = chunk.iter().map(|(_, t)| *t).collect();
                    self.visibility_batch(url, queue, &tokens, 0).await?
                } else {
                    let entries = chunk
                        .iter()
                        .enumerate()
                        .map(|(i, (_, t))| {
                            DeleteMessageBatchRequestEntry::builder()
                                .id(i.to_string())
                                .receipt_handle(&t.handle)
                                .build()
                                .map_err(|e| BrokerError::permanent(e.to_string()))
                        })
                        .collect::<Result<Vec<_>, _>>()?;
                    let out = self
                        .inner
                        .client
                        .delete_message_batch()
                        .queue_url(url)
                        .set_entries(Some(entries))
                        .send()
                        .await
                        .map_err(|e| sdk_error("DeleteMessageBatch", queue, e))?;
                    out.failed
                        .into_iter()
                        .filter_map(|f| Some((f.id.parse().ok()?, f.code)))
                        .collect()
                };
                let mut transient = None;
                for (i, (r, t)) in chunk.iter().enumerate() {
                    match failed.iter().find(|(id, _)| *id == i) {
                        None => t.set_until(t.received),
                        Some((_, code)) if receipt_gone(code) => {
                            t.set_until(t.received);
                            lost = Some(r.queue().to_string());
                        }
                        Some((_, code)) => transient = Some(code.clone()),
                    }
                }
                if let Some(code) = transient {
                    return Err(BrokerError::transient(format!(
                        "{} {queue}: SQS failed on its side: {code}",
                        if release { "release" } else { "ack" }
                    )));
                }
            }
        }
        match lost {
            Some(queue) => Err(BrokerError::LeaseLost { queue }),
            None => Ok(()),
        }
    }

    async fn counts(&self, url: &str, queue: &str) -> Result<[u64; 3], BrokerError> {
        let out = self
            .inner
            .client
            .get_queue_attributes()
            .queue_url(url)
            .attribute_names(QueueAttributeName::ApproximateNumberOfMessages)
            .attribute_names(QueueAttributeName::ApproximateNumberOfMessagesNotVisible)
            .attribute_names(QueueAttributeName::ApproximateNumberOfMessagesDelayed)
            .send()
            .await
            .map_err(|e| sdk_error("GetQueueAttributes", queue, e))?;
        let a = out.attributes.unwrap_or_default();
        let n = |k: QueueAttributeName| a.get(&k).and_then(|v| v.parse().ok()).unwrap_or(0u64);
        Ok([
            n(QueueAttributeName::ApproximateNumberOfMessages),
            n(QueueAttributeName::ApproximateNumberOfMessagesNotVisible),
            n(QueueAttributeName::ApproximateNumberOfMessagesDelayed),
        ])
    }

    /// The hold of FIFO queue `physical`.
    fn hold(&self, physical: &str) -> Arc<fifo::Hold> {
        let mut holds = self.inner.holds.lock().unwrap_or_else(|e| e.into_inner());
        holds.entry(physical.to_string()).or_default().clone()
    }

    /// Receive on a FIFO queue: at most one message per group handed out (the `fifo` module).
    /// A held message whose group comes free is handed out at once; the SQS call this receive
    /// waits on meanwhile is kept for the next receive.
    async fn receive_fifo(
        &self,
        queue: &str,
        url: &str,
        opts: ReceiveOptions,
    ) -> Result<Vec<Delivery>, BrokerError> {
        /// Puts a receive back into the hold when the caller stops waiting for it.
        struct Kept {
            hold: Arc<fifo::Hold>,
            task: Option<fifo::Pending>,
        }
        impl Drop for Kept {
            fn drop(&mut self) {
                if let Some(t) = self.task.take() {
                    self.hold.keep(t);
                }
            }
        }
        let hold = self.hold(queue);
        let max = opts.max.clamp(1, 10);
        loop {
            let ready = hold.take_ready(max);
            if !ready.is_empty() {
                return Ok(self.refresh(queue, url, &hold, ready, opts.lease).await);
            }
            let task = match hold.take_pending() {
                Some(t) => t,
                None => {
                    let (this, q, u, h) = (
                        self.clone(),
                        queue.to_string(),
                        url.to_string(),
                        hold.clone(),
                    );
                    tokio::spawn(async move {
                        this.receive_from(&q, &u, max, opts.wait, opts.lease, Some(&h))
                            .await
                    })
                }
            };
            let mut kept = Kept {
                hold: hold.clone(),
                task: Some(task),
            };
            let Some(t) = kept.task.as_mut() else {
                continue;
            };
            let joined = tokio::select! {
                j = t => Some(j),
                _ = hold.freed.notified() => None,
            };
            let Some(joined) = joined else {
                // A group came free: hand out its next message; `kept` keeps the receive.
                continue;
            };
            kept.task = None;
            let got =
                joined.map_err(|e| BrokerError::transient(format!("receive {queue}: {e}")))??;
            let out = hold.distribute(got, max);
            return Ok(self.refresh(queue, url, &hold, out, opts.lease).await);
        }
    }

    /// Held FIFO messages being handed out: those with less than two thirds of `lease` left get
    /// the full lease first (the runtime renews a lease a third of the way through). One whose
    /// receipt SQS no longer honours is dropped, and what is held behind it goes back to SQS.
    async fn refresh(
        &self,
        queue: &str,
        url: &str,
        hold: &fifo::Hold,
        ready: Vec<Delivery>,
        lease: Duration,
    ) -> Vec<Delivery> {
        let secs = ceil_secs(lease, 1, MAX_VISIBILITY.as_secs() as i32);
        let full = Duration::from_secs(secs as u64);
        let now = Instant::now();
        let short: Vec<(usize, &Token)> = ready
            .iter()
            .enumerate()
            .filter_map(|(i, d)| Some((i, d.receipt.token::<Token>()?)))
            .filter(|(_, t)| {
                t.until().saturating_duration_since(now) < full * 2 / 3
                    && now + full <= t.received + MAX_VISIBILITY
            })
            .collect();
        let mut gone = vec![false; ready.len()];
        for chunk in short.chunks(10) {
            let tokens: Vec<&Token> = chunk.iter().map(|(_, t)| *t).collect();
            match self.visibility_batch(url, queue, &tokens, secs).await {
                Ok(failed) => {
                    for (j, (i, t)) in chunk.iter().enumerate() {
                        match failed.iter().find(|(k, _)| *k == j) {
                            None => t.set_until(now + full),
                            Some((_, code)) if receipt_gone(code) => {
                                t.set_until(t.received);
                                gone[*i] = true;
                            }
                            Some(_) => {}
                        }
                    }
                }
                Err(e) => tracing::debug!(
                    queue,
                    error = %e,
                    "could not extend held FIFO messages before handing them out"
                ),
            }
        }
        let mut out = Vec::with_capacity(ready.len());
        for (d, gone) in ready.into_iter().zip(gone) {
            if !gone {
                out.push(d);
                continue;
            }
            if let Some((_, group, handle)) = fifo::member_of(&d.receipt) {
                let behind = hold.take_behind(group, handle);
                hold.free(group, handle);
                if let Err(e) = self.settle_batches(&behind, true).await {
                    tracing::debug!(queue, error = %e, "releasing held FIFO messages");
                }
            }
        }
        out
    }

    /// After the lease of a FIFO message handed out was extended to `until`: the held messages of
    /// its group get the same visibility, so they do not come back while it runs. If SQS refuses
    /// one, all of them go back (they must not overtake it).
    async fn extend_behind(&self, receipt: &Receipt, secs: i32, now: Instant, until: Instant) {
        let Some((hold, group, handle)) = fifo::member_of(receipt) else {
            return;
        };
        let behind = hold.behind(group, handle);
        let tokens: Vec<&Token> = behind
            .iter()
            .filter_map(|r| r.token::<Token>())
            .filter(|t| t.live(now) && until <= t.received + MAX_VISIBILITY)
            .collect();
        if tokens.is_empty() {
            return;
        }
        let url = tokens[0].url.clone();
        let mut refused = tokens.len() < behind.len();
        for chunk in tokens.chunks(10) {
            match self
                .visibility_batch(&url, receipt.queue(), chunk, secs)
                .await
            {
                Ok(failed) => {
                    for (j, t) in chunk.iter().enumerate() {
                        if failed.iter().any(|(k, _)| *k == j) {
                            refused = true;
                        } else {
                            t.set_until(until);
                        }
                    }
                }
                Err(e) => {
                    tracing::debug!(error = %e, "extending held FIFO messages; retried at the next beat");
                }
            }
        }
        if refused {
            let back = hold.take_behind(group, handle);
            if let Err(e) = self.settle_batches(&back, true).await {
                tracing::debug!(error = %e, "releasing held FIFO messages");
            }
        }
    }

    /// Receives from `url` and turns SQS messages into deliveries of `queue`.
    async fn receive_from(
        &self,
        queue: &str,
        url: &str,
        max: usize,
        wait: Duration,
        lease: Duration,
        hold: Option<&Arc<fifo::Hold>>,
    ) -> Result<Vec<Delivery>, BrokerError> {
        let visibility = ceil_secs(lease, 1, MAX_VISIBILITY.as_secs() as i32);
        let wait_secs = ceil_secs(wait.min(MAX_WAIT), 0, MAX_WAIT.as_secs() as i32);
        let taken = Instant::now();
        let call = self
            .inner
            .client
            .receive_message()
            .queue_url(url)
            .max_number_of_messages(max.clamp(1, 10) as i32)
            .wait_time_seconds(wait_secs)
            .visibility_timeout(visibility)
            .message_system_attribute_names(MessageSystemAttributeName::ApproximateReceiveCount)
            .message_system_attribute_names(MessageSystemAttributeName::SentTimestamp)
            .message_system_attribute_names(MessageSystemAttributeName::MessageGroupId)
            .message_attribute_names("All")
            .send();
        let limit = Duration::from_secs(wait_secs as u64) + self.inner.config.timeout;
        let out = tokio::time::timeout(limit, call)
            .await
            .map_err(|_| BrokerError::Timeout(limit))?
            .map_err(|e| self.forget_if_missing(queue, sdk_error("ReceiveMessage", queue, e)))?;
        let url: Arc<str> = url.into();
        let until = taken + Duration::from_secs(visibility as u64);
        let queue_name: Arc<str> = queue.into();
        Ok(out
            .messages
            .unwrap_or_default()
            .into_iter()
            .filter_map(|m| {
                let handle = m.receipt_handle?;
                let sys = m.attributes.unwrap_or_default();
                let count = sys
                    .get(&MessageSystemAttributeName::ApproximateReceiveCount)
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(1u32)
                    .max(1);
                let sent = sys
                    .get(&MessageSystemAttributeName::SentTimestamp)
                    .and_then(|v| v.parse().ok());
                let member = match (hold, sys.get(&MessageSystemAttributeName::MessageGroupId)) {
                    (Some(hold), Some(group)) => Some(fifo::Member {
                        hold: Arc::downgrade(hold),
                        group: group.as_str().into(),
                    }),
                    _ => None,
                };
                let id = m.message_id.unwrap_or_default();
                let envelope = wire::decode(&id, m.body, m.message_attributes, sent);
                Some(Delivery {
                    envelope,
                    receipt: Receipt::new(
                        queue_name.clone(),
                        Token {
                            url: url.clone(),
                            handle,
                            received: taken,
                            until: Mutex::new(until),
                            member,
                        },
                    ),
                    delivery_count: count,
                })
            })
            .collect())
    }
}

#[async_trait]
impl Broker for SqsBroker {
    fn name(&self) -> &'static str {
        "sqs"
    }

    fn capabilities(&self) -> &Capabilities {
        &self.inner.standard
    }

    fn queue_capabilities(&self, queue: &str) -> &Capabilities {
        if self.inner.config.fifo.is_fifo(queue) {
            &self.inner.fifo
        } else {
            &self.inner.standard
        }
    }

    async fn prepare(&self, queues: &[String]) -> Result<(), BrokerError> {
        self.check_open()?;
        for q in queues {
            self.queue(q).await?;
        }
        Ok(())
    }

    async fn publish(&self, queue: &str, messages: Vec<Envelope>) -> Result<(), BrokerError> {
        self.check_open()?;
        if messages.is_empty() {
            return Ok(());
        }
        self.queue_capabilities(queue)
            .check_payloads(&messages, "sqs")?;
        let q = self.queue(queue).await?;
        if !q.fifo {
            return self.send(queue, &q.url, q.max_size, false, &messages).await;
        }
        // A FIFO queue takes no per-message delay: what is not due waits in its delay queue.
        let now = SystemTime::now();
        let (later, due): (Vec<_>, Vec<_>) = messages
            .into_iter()
            .partition(|m| m.delay_remaining(now).is_some());
        if !due.is_empty() {
            self.send(queue, &q.url, q.max_size, true, &due).await?;
        }
        if !later.is_empty() {
            self.schedule_fifo(queue, &q, &later).await?;
        }
        Ok(())
    }

    async fn receive(
        &self,
        queue: &str,
        opts: ReceiveOptions,
    ) -> Result<Vec<Delivery>, BrokerError> {
        self.check_open()?;
        let q = self.queue(queue).await?;
        if q.fifo {
            return self.receive_fifo(queue, &q.url, opts).await;
        }
        self.receive_from(queue, &q.url, opts.max, opts.wait, opts.lease, None)
            .await
    }

    async fn ack(&self, receipts: &[Receipt]) -> Result<(), BrokerError> {
        self.settle(receipts, false).await
    }

    async fn release(&self, receipts: &[Receipt]) -> Result<(), BrokerError> {
        self.settle(receipts, true).await
    }

    /// On a standard queue, [`stevedore_core::resend_uncounted`] (SQS counts every receive in
    /// `ApproximateReceiveCount`, and nothing can undo that): the copy carries the attempt and
    /// goes to the back of the queue. On a FIFO queue a copy would overtake nothing but be
    /// overtaken by the rest of its group, breaking the group's order, so there the release is
    /// the plain, counted one: a FIFO job given back at a shutdown uses an attempt.
    async fn release_uncounted(&self, deliveries: Vec<Delivery>) -> Result<(), BrokerError> {
        let (fifo, standard): (Vec<Delivery>, Vec<Delivery>) = deliveries
            .into_iter()
            .partition(|d| self.inner.config.fifo.is_fifo(d.receipt.queue()));
        let mut result = Ok(());
        if !fifo.is_empty() {
            let receipts: Vec<Receipt> = fifo.into_iter().map(|d| d.receipt).collect();
            result = self.settle(&receipts, true).await;
        }
        if !standard.is_empty() {
            let resent = stevedore_core::resend_uncounted(self, standard).await;
            result = result.and(resent);
        }
        result
    }

    async fn extend_lease(&self, receipt: &Receipt, lease: Duration) -> Result<(), BrokerError> {
        self.check_open()?;
        let lost = || BrokerError::LeaseLost {
            queue: receipt.queue().to_string(),
        };
        let token = receipt.token::<Token>().ok_or_else(lost)?;
        let now = Instant::now();
        if !token.live(now) {
            return Err(lost());
        }
        let secs = ceil_secs(lease, 1, MAX_VISIBILITY.as_secs() as i32);
        let until = now + Duration::from_secs(secs as u64);
        if until > token.received + MAX_VISIBILITY {
            return Err(BrokerError::permanent(format!(
                "extend lease on {}: SQS keeps a message invisible for at most 12 h after it was \
                 received, and this job has held it {}s; the lease is not extended and the \
                 message becomes visible again when its current lease ends",
                receipt.queue(),
                now.duration_since(token.received).as_secs()
            )));
        }
        match self
            .inner
            .client
            .change_message_visibility()
            .queue_url(&*token.url)
            .receipt_handle(&token.handle)
            .visibility_timeout(secs)
            .send()
            .await
        {
            Ok(_) => {
                token.set_until(until);
                self.extend_behind(receipt, secs, now, until).await;
                Ok(())
            }
            Err(e) if e.code().is_some_and(receipt_gone) => {
                token.set_until(token.received);
                Err(lost())
            }
            Err(e) => Err(sdk_error("ChangeMessageVisibility", receipt.queue(), e)),
        }
    }

    async fn depth(&self, queue: &str) -> Result<Depth, BrokerError> {
        self.check_open()?;
        let q = self.queue(queue).await?;
        let [ready, in_flight, delayed] = self.counts(&q.url, queue).await?;
        let delayed = match &q.delay_url {
            Some(d) => delayed + self.counts(d, queue).await?.iter().sum::<u64>(),
            None => delayed,
        };
        Ok(Depth {
            ready,
            in_flight,
            delayed: Some(delayed),
            oldest_age: None,
        })
    }

    fn delay_store(&self) -> Option<Arc<dyn DelayStore>> {
        // Only FIFO queues need it; standard queues delay natively (hops beyond 15 minutes).
        let fifo = &self.inner.config.fifo;
        if fifo.all || !fifo.queues.is_empty() {
            Some(Arc::new(delay::FifoDelay(self.clone())))
        } else {
            None
        }
    }

    /// Closes the handle. Held FIFO messages go back to SQS at once (their groups would
    /// otherwise wait out the lease); a receive kept from an earlier call is given a second to
    /// finish and what it got goes back too.
    async fn close(&self) -> Result<(), BrokerError> {
        if self.inner.closed.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        let holds: Vec<Arc<fifo::Hold>> = {
            let holds = self.inner.holds.lock().unwrap_or_else(|e| e.into_inner());
            holds.values().cloned().collect()
        };
        for hold in holds {
            let (mut back, pending) = hold.take_all();
            for mut task in pending {
                match tokio::time::timeout(Duration::from_secs(1), &mut task).await {
                    Ok(Ok(Ok(got))) => back.extend(got.into_iter().map(|d| d.receipt)),
                    Ok(_) => {}
                    Err(_) => task.abort(),
                }
            }
            if let Err(e) = self.settle_batches(&back, true).await {
                tracing::debug!(error = %e, "releasing held FIFO messages at close");
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fifo_queues_by_logical_name() {
        let f = FifoQueues {
            all: false,
            queues: ["orders".to_string()].into(),
        };
        assert!(f.is_fifo("orders"));
        assert!(f.is_fifo("orders__high"));
        assert!(f.is_fifo("orders__dlq"));
        assert!(!f.is_fifo("emails"));
        assert_eq!(
            stevedore_core::names::physical("a", stevedore_core::Priority::Low),
            "a__low"
        );
    }

    #[test]
    fn seconds_round_up_never_early() {
        assert_eq!(ceil_secs(Duration::from_millis(1), 0, 900), 1);
        assert_eq!(ceil_secs(Duration::from_millis(1000), 0, 900), 1);
        assert_eq!(ceil_secs(Duration::from_millis(1001), 0, 900), 2);
        assert_eq!(ceil_secs(Duration::from_secs(5000), 0, 900), 900);
        assert_eq!(ceil_secs(Duration::ZERO, 1, 900), 1);
    }

    #[test]
    fn credentials_never_show() {
        let c = SqsCredentials::Static {
            access_key_id: "AKIAABCDEFGHIJKL".into(),
            secret_access_key: "very-secret".into(),
            session_token: None,
        };
        let shown = format!("{c:?}");
        assert!(
            !shown.contains("very-secret") && !shown.contains("ABCDEFGH"),
            "{shown}"
        );
    }
}

/// Entry points for the fuzz targets in `fuzz/` (the `fuzzing` feature; not an API): the
/// decoder of a received message's body and attributes, and the encoder it must round-trip with.
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing {
    use aws_sdk_sqs::types::MessageAttributeValue;
    use std::collections::HashMap;
    use stevedore_core::Envelope;

    /// Decodes a message with this body and attributes (name, data type, string value).
    pub fn decode(
        message_id: &str,
        body: Option<String>,
        attributes: Vec<(String, String, String)>,
        sent_ms: Option<u64>,
    ) -> Envelope {
        let attributes: HashMap<String, MessageAttributeValue> = attributes
            .into_iter()
            .filter_map(|(k, t, v)| {
                let value = MessageAttributeValue::builder()
                    .data_type(t)
                    .string_value(v)
                    .build()
                    .ok()?;
                Some((k, value))
            })
            .collect();
        crate::wire::decode(message_id, body, Some(attributes), sent_ms)
    }

    /// Encodes an envelope as its send would, then decodes what SQS would hand back.
    pub fn round_trip(env: &Envelope, message_id: &str) -> Envelope {
        let out = crate::wire::encode(env);
        crate::wire::decode(message_id, Some(out.body), Some(out.attributes), None)
    }
}
