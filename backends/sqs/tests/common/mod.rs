//! The hook the SQS conformance runs share: a private moto server per test binary, the backend
//! talking to it with explicit endpoint, region and static credentials (never the AWS credential
//! chain, never the instance-metadata address), and a plain boto3 producer for foreign messages.

use std::sync::Arc;
use stevedore_conformance::servers::MotoServer;
use stevedore_conformance::{async_trait, Backend};
use stevedore_core::{Broker, BrokerError};
use stevedore_sqs::{FifoQueues, SqsBroker, SqsConfig, SqsCredentials};

pub(crate) const REGION: &str = "us-east-1";

pub(crate) struct SqsBackend {
    pub(crate) server: MotoServer,
    pub(crate) fifo: bool,
}

impl SqsBackend {
    pub(crate) fn start(fifo: bool) -> Arc<dyn Backend> {
        std::env::set_var("AWS_EC2_METADATA_DISABLED", "true");
        let server = MotoServer::start().unwrap_or_else(|e| panic!("{e}"));
        Arc::new(SqsBackend { server, fifo })
    }

    pub(crate) fn config(endpoint: String, fifo: bool) -> SqsConfig {
        let mut c = SqsConfig::new(
            REGION,
            SqsCredentials::Static {
                access_key_id: "testing".into(),
                secret_access_key: "testing".into(),
                session_token: None,
            },
        );
        c.endpoint = Some(endpoint);
        c.fifo = FifoQueues {
            all: fifo,
            ..FifoQueues::default()
        };
        c
    }
}

/// What `aws sqs send-message --queue-url ... --message-body ...` sends, through boto3 (which
/// moto's server brings along): a plain body, no attributes.
pub(crate) fn boto3_send(
    endpoint: &str,
    queue_name: &str,
    body: &[u8],
    fifo: bool,
) -> Result<(), String> {
    use std::io::Write as _;
    let script = r#"
import sys, uuid, boto3
endpoint, name, fifo = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
c = boto3.client("sqs", endpoint_url=endpoint, region_name="us-east-1",
                 aws_access_key_id="testing", aws_secret_access_key="testing")
url = c.get_queue_url(QueueName=name)["QueueUrl"]
# A group per message, as a producer keyed by entity would: the scenario holds both messages at
# once, which one group would rightly forbid (the next of a group waits for the one before it).
extra = {"MessageGroupId": str(uuid.uuid4()), "MessageDeduplicationId": str(uuid.uuid4())} if fifo else {}
c.send_message(QueueUrl=url, MessageBody=sys.stdin.read(), **extra)
"#;
    let mut child = std::process::Command::new("python3")
        .args([
            "-c",
            script,
            endpoint,
            queue_name,
            if fifo { "1" } else { "0" },
        ])
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| format!("python3 with boto3: {e}"))?;
    child
        .stdin
        .take()
        .ok_or("stdin")?
        .write_all(body)
        .map_err(|e| e.to_string())?;
    let out = child.wait_with_output().map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "boto3 send_message failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

#[async_trait]
impl Backend for SqsBackend {
    fn name(&self) -> &'static str {
        if self.fifo {
            "sqs-fifo"
        } else {
            "sqs"
        }
    }

    async fn connect(&self) -> Result<Arc<dyn Broker>, BrokerError> {
        Ok(Arc::new(
            SqsBroker::connect(Self::config(self.server.endpoint(), self.fifo)).await?,
        ))
    }

    async fn publish_foreign(&self, queue: &str, body: &[u8]) -> Result<(), String> {
        let name = if self.fifo {
            format!("{queue}.fifo")
        } else {
            queue.to_string()
        };
        let (endpoint, body, fifo) = (self.server.endpoint(), body.to_vec(), self.fifo);
        tokio::task::spawn_blocking(move || boto3_send(&endpoint, &name, &body, fifo))
            .await
            .map_err(|e| e.to_string())?
    }

    /// Each scenario gets a moto server of its own. moto serves one request at a time (the
    /// launcher makes each SQS call atomic, as SQS is, and Python's GIL allows no more), so the
    /// suite's concurrent scenarios on one server queue behind each other: in full runs an
    /// extension call took over 0.5 s and the 3,000-message ordering scenario missed its minute
    /// behind scenario 2's 20 consumers. SQS itself is a fleet with no such shared queue; every
    /// scenario keeps its own concurrency on its server.
    async fn isolated(&self, _restarts: bool) -> Result<Option<Arc<dyn Backend>>, String> {
        let fifo = self.fifo;
        let server = tokio::task::spawn_blocking(MotoServer::start)
            .await
            .map_err(|e| e.to_string())??;
        Ok(Some(Arc::new(SqsBackend { server, fifo })))
    }

    async fn restart(&self) -> Result<(), String> {
        Err(
            "moto keeps queues and messages in memory only, so a restarted moto has none: the \
             scenario would count moto's loss, not the backend's. Reconnection across an \
             endpoint outage is tested in sqs_backend.rs instead"
                .into(),
        )
    }
}
