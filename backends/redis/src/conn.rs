//! Connections to one Redis server or to a Redis Cluster, behind one type, so every command and
//! script runs the same way on both. In a cluster, a command goes to the master of its key's
//! slot (`MOVED` and `ASK` are followed, and the slot map refreshed, by the client); a pipeline
//! must keep to one slot, which the key layout guarantees (see `RedisBroker::slot_tag`).

use crate::{redact, RedisConfig, RESPONSE_TIMEOUT};
use redis::aio::{
    ConnectionLike, ConnectionManager, ConnectionManagerConfig, MultiplexedConnection,
};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::{AsyncConnectionConfig, Client, Cmd, Pipeline, RedisError, RedisFuture, Value};
use std::time::Duration;
use stevedore_core::BrokerError;

/// How long to wait for a connection to open.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// One open connection: a reconnecting manager (commands on one server), a plain multiplexed
/// connection (blocking reads on one server), or a cluster connection (either, on a cluster).
/// Cheap to clone; clones share the connection.
#[derive(Clone)]
pub(crate) enum Conn {
    Managed(ConnectionManager),
    Plain(MultiplexedConnection),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Managed(c) => c.req_packed_command(cmd),
            Conn::Plain(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Managed(c) => c.req_packed_commands(cmd, offset, count),
            Conn::Plain(c) => c.req_packed_commands(cmd, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Managed(c) => c.get_db(),
            Conn::Plain(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

/// What opens connections: a client of one server, or two clients of a cluster (commands with a
/// response timeout; blocking reads without one, since their caller bounds each read itself).
#[derive(Clone)]
pub(crate) enum Connector {
    Node(Box<Client>),
    Cluster(Box<ClusterClients>),
}

/// The two clients of a cluster.
#[derive(Clone)]
pub(crate) struct ClusterClients {
    commands: ClusterClient,
    blocking: ClusterClient,
}

impl std::fmt::Debug for Connector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Connector::Node(_) => "Node",
            Connector::Cluster(_) => "Cluster",
        })
    }
}

/// The URL schemes of this backend.
pub(crate) const SCHEMES: &[&str] = &["redis://", "rediss://"];

/// The node URLs of a `url` setting: split at each comma a `redis://` or `rediss://` URL
/// follows (so a comma in a password stays in its URL), blanks trimmed.
pub(crate) fn seeds(url: &str) -> Vec<String> {
    stevedore_core::factory::url_list(url, SCHEMES)
        .into_iter()
        .map(str::to_string)
        .collect()
}

impl Connector {
    /// A connector for `config` (`config.cluster` picks the kind). Fails, permanently, only on
    /// a URL that does not parse.
    pub(crate) fn new(config: &RedisConfig) -> Result<Connector, BrokerError> {
        let url_redacted = redact(&config.url);
        if config.url.contains("rediss://") {
            // Ignored when a provider is already installed (by us or by the application).
            let _ = rustls::crypto::ring::default_provider().install_default();
        }
        let invalid = |e: RedisError| {
            BrokerError::permanent(format!("invalid redis url {url_redacted}: {e}"))
        };
        if !config.cluster {
            return Ok(Connector::Node(Box::new(
                Client::open(config.url.as_str()).map_err(invalid)?,
            )));
        }
        let nodes = seeds(&config.url);
        if nodes.is_empty() {
            return Err(BrokerError::permanent(
                "redis cluster: url names no node (give one or more redis:// URLs, separated by commas)",
            ));
        }
        // Each request may be retried by the client while the cluster moves a slot or elects a
        // new master; the overall bound keeps a command from waiting longer than on one server.
        let commands = ClusterClient::builder(nodes.clone())
            .connection_timeout(CONNECT_TIMEOUT)
            .response_timeout(RESPONSE_TIMEOUT)
            .retries(6)
            .max_retry_wait(2_000)
            .build()
            .map_err(invalid)?;
        let blocking = ClusterClient::builder(nodes)
            .connection_timeout(CONNECT_TIMEOUT)
            .response_timeout(Duration::from_secs(24 * 3600))
            .overall_response_timeout(None)
            .retries(2)
            .build()
            .map_err(invalid)?;
        Ok(Connector::Cluster(Box::new(ClusterClients {
            commands,
            blocking,
        })))
    }

    /// Whether this is a cluster.
    pub(crate) fn is_cluster(&self) -> bool {
        matches!(self, Connector::Cluster(_))
    }

    /// The connection for short commands: it reconnects on its own, and a reply that takes
    /// [`RESPONSE_TIMEOUT`] fails the command.
    pub(crate) async fn commands(&self) -> Result<Conn, RedisError> {
        match self {
            Connector::Node(client) => {
                let cfg = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(CONNECT_TIMEOUT))
                    .set_response_timeout(Some(RESPONSE_TIMEOUT))
                    .set_number_of_retries(6)
                    .set_max_delay(Duration::from_secs(2));
                Ok(Conn::Managed(
                    ConnectionManager::new_with_config((**client).clone(), cfg).await?,
                ))
            }
            Connector::Cluster(c) => Ok(Conn::Cluster(c.commands.get_async_connection().await?)),
        }
    }

    /// A fresh connection for blocking reads, with no response timeout of its own.
    pub(crate) async fn blocking(&self) -> Result<Conn, RedisError> {
        match self {
            Connector::Node(client) => {
                let cfg = AsyncConnectionConfig::new()
                    .set_connection_timeout(Some(CONNECT_TIMEOUT))
                    .set_response_timeout(None);
                Ok(Conn::Plain(
                    client
                        .get_multiplexed_async_connection_with_config(&cfg)
                        .await?,
                ))
            }
            Connector::Cluster(c) => Ok(Conn::Cluster(c.blocking.get_async_connection().await?)),
        }
    }
}

/// Whether `key` has a hash tag: a `{` followed later by a `}` with something between them. In
/// a cluster only the tag is hashed, so keys with the same tag share a slot.
pub(crate) fn has_hash_tag(key: &str) -> bool {
    key.find('{')
        .and_then(|open| key[open + 1..].find('}'))
        .is_some_and(|len| len > 0)
}

/// Checks a key prefix for a cluster: it must have a complete hash tag or no brace at all (a lone
/// brace would change which part of each key is hashed, splitting a queue's keys across slots).
pub(crate) fn check_cluster_prefix(prefix: &str) -> Result<(), String> {
    if (prefix.contains('{') || prefix.contains('}')) && !has_hash_tag(prefix) {
        return Err(format!(
            "key_prefix {prefix:?} has a brace but no hash tag: on a cluster a prefix has either no brace or a complete tag such as \"{{app}}:\" (which puts every key in one slot)"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_tags_follow_redis_rules() {
        assert!(has_hash_tag("{emails}"));
        assert!(has_hash_tag("app:{emails}:x"));
        assert!(has_hash_tag("a{b{c}d"));
        assert!(!has_hash_tag("emails"));
        assert!(!has_hash_tag("a{}b"));
        assert!(!has_hash_tag("a}b{c"));
        assert!(check_cluster_prefix("").is_ok());
        assert!(check_cluster_prefix("app:").is_ok());
        assert!(check_cluster_prefix("{app}:").is_ok());
        assert!(check_cluster_prefix("app{").is_err());
        assert!(check_cluster_prefix("a}").is_err());
    }

    #[test]
    fn seeds_split_at_commas_before_a_url() {
        assert_eq!(
            seeds(" redis://a:1 ,rediss://b:2"),
            vec!["redis://a:1".to_string(), "rediss://b:2".to_string()]
        );
        assert_eq!(
            seeds("redis://:p,w@h:1"),
            vec!["redis://:p,w@h:1".to_string()]
        );
    }
}
