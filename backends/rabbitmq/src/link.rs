//! The connection: connecting, its publish and admin channels, declaring queues, publishing with
//! confirms, and mapping lapin's errors onto [`BrokerError`].

use bytes::Bytes;
use futures::future::join_all;
use lapin::auth::AuthProvider;
use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, ExchangeBindOptions, ExchangeDeclareOptions,
    QueueBindOptions, QueueDeclareOptions,
};
use lapin::protocol::{AMQPErrorKind, AMQPHardError, AMQPSoftError};
use lapin::tcp::OwnedTLSConfig;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::uri::{AMQPUri, SASLMechanism};
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, ErrorKind,
    ExchangeKind as ExchangeKind_,
};
use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};
use stevedore_core::BrokerError;

/// Longest wait for the TCP/TLS connection and the AMQP handshake.
pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How many channels declares and binds are spread over.
const ADMIN_CHANNELS: usize = 8;
/// Longest wait for one synchronous AMQP call or for the confirms of one publish batch.
pub(crate) const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// What kind of queue a name is declared as.
#[derive(Clone, Copy, Debug)]
pub(crate) enum QueueKind<'a> {
    /// A work queue: durable, quorum (so redeliveries are counted).
    Work,
    /// A delay level: durable, classic, every message expires after `ttl_ms` into exchange `dlx`
    /// with its routing key kept.
    Level { ttl_ms: u64, dlx: &'a str },
    /// A plain durable classic queue.
    Plain,
}

/// What a binding binds to an exchange.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Bind {
    Queue,
    Exchange,
}

/// What kind of exchange a name is declared as.
#[derive(Clone, Copy, Debug)]
pub(crate) enum ExchangeKind<'a> {
    Fanout,
    /// A headers exchange, whose unroutable messages go to `alternate` if set.
    Headers {
        alternate: Option<&'a str>,
    },
}

/// One AMQP connection and what lives on it. Replaced as a whole when it breaks; `gen` tells
/// receipts and channels of an older connection apart.
pub(crate) struct Link {
    pub gen: u64,
    pub conn: Connection,
    /// Confirm-mode channel every publish goes through.
    pub publish: Channel,
    /// Channel for declares; re-opened when a declare error closes it.
    /// Channels for declares and binds, used in turn so that many declares (the shared delay
    /// topology: ~130 of them) run side by side instead of one round trip after another; each is
    /// re-opened when a declare error closes it.
    admin: Vec<tokio::sync::Mutex<Option<Channel>>>,
    next_admin: std::sync::atomic::AtomicUsize,
    /// AMQP queue names declared on this connection, and exchanges and bindings by description.
    declared: Mutex<HashSet<String>>,
    /// Work queues declared and bound to the delay topology's deliver exchange.
    work_ready: Mutex<HashSet<String>>,
    broken: AtomicBool,
}

impl Link {
    /// Connects and opens the publish channel in confirm mode.
    pub(crate) async fn open(
        url: &str,
        redacted: &str,
        name: &str,
        tls_ca_pem: Option<&str>,
        gen: u64,
    ) -> Result<Link, BrokerError> {
        let mut uri: AMQPUri = url.parse().map_err(|e: String| {
            BrokerError::permanent(format!(
                "invalid RabbitMQ url {redacted}: {}",
                e.replace(url, redacted)
            ))
        })?;
        let mut props = ConnectionProperties::default()
            .with_connection_name(LongString::from(name.to_string()));
        if matches!(uri.query.auth_mechanism, None | Some(SASLMechanism::Plain)) {
            // The password goes to the server through this provider only, never inside the URI
            // that lapin's dependencies log at trace level.
            let info = &mut uri.authority.userinfo;
            props = props.with_auth_provider(PlainAuth {
                user: std::mem::take(&mut info.username),
                password: std::mem::replace(&mut info.password, "***".into()),
            });
        }
        let tls = OwnedTLSConfig {
            identity: None,
            cert_chain: tls_ca_pem.map(str::to_string),
        };
        let runtime = lapin::runtime::default_runtime()
            .map_err(|e| BrokerError::permanent(format!("no async runtime for lapin: {e}")))?;
        let connecting = Connection::connect_uri_with_config(uri, props, tls, runtime);
        let conn = match tokio::time::timeout(CONNECT_TIMEOUT, connecting).await {
            Err(_) => {
                return Err(BrokerError::Connection(format!(
                    "cannot connect to {redacted}: no answer within {CONNECT_TIMEOUT:?}"
                )))
            }
            Ok(Err(e)) => return Err(connect_error(&e, redacted)),
            Ok(Ok(c)) => c,
        };
        let publish = call("open the publish channel", conn.create_channel()).await?;
        call(
            "enable publisher confirms",
            publish.confirm_select(ConfirmSelectOptions::default()),
        )
        .await?;
        Ok(Link {
            gen,
            conn,
            publish,
            admin: (0..ADMIN_CHANNELS)
                .map(|_| tokio::sync::Mutex::new(None))
                .collect(),
            next_admin: std::sync::atomic::AtomicUsize::new(0),
            declared: Mutex::new(HashSet::new()),
            work_ready: Mutex::new(HashSet::new()),
            broken: AtomicBool::new(false),
        })
    }

    /// Whether the connection and its publish channel are still usable.
    pub(crate) fn alive(&self) -> bool {
        !self.broken.load(Ordering::Acquire)
            && self.conn.status().connected()
            && self.publish.status().connected()
    }

    /// Marks the connection unusable when `e` says it (or its publish channel) broke, so the next
    /// call reconnects. Returns `e`.
    pub(crate) fn note(&self, e: BrokerError) -> BrokerError {
        if e.is_transient() && !self.alive() {
            self.broken.store(true, Ordering::Release);
        }
        e
    }

    /// Forces a reconnect on the next call.
    pub(crate) fn mark_broken(&self) {
        self.broken.store(true, Ordering::Release);
    }

    fn declared(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        self.declared.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records that something (a set of declarations) is done on this connection.
    pub(crate) fn mark_declared(&self, what: &str) {
        self.declared().insert(what.to_string());
    }

    pub(crate) fn is_declared(&self, amqp: &str) -> bool {
        self.declared().contains(amqp)
    }

    /// Forgets that `amqp` was declared (it was deleted under us), and its bindings, so the next
    /// use declares and binds it again.
    pub(crate) fn forget(&self, amqp: &str) {
        let bindings = format!("bind {:?} {amqp} ", Bind::Queue);
        self.declared()
            .retain(|k| k != amqp && !k.starts_with(&bindings));
        self.work_ready().remove(amqp);
    }

    fn work_ready(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        self.work_ready.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether work queue `amqp` was declared and bound on this connection (the publish path's
    /// one check: a lookup, no allocation).
    pub(crate) fn is_work_ready(&self, amqp: &str) -> bool {
        self.work_ready().contains(amqp)
    }

    /// Records that work queue `amqp` is declared and bound.
    pub(crate) fn mark_work_ready(&self, amqp: &str) {
        self.work_ready().insert(amqp.to_string());
    }

    /// A usable admin channel (the next in turn), opened anew if the last one there was closed by
    /// an error.
    async fn admin(&self) -> Result<Channel, BrokerError> {
        let i = self.next_admin.fetch_add(1, Ordering::Relaxed) % self.admin.len();
        let mut slot = self.admin[i].lock().await;
        if let Some(c) = slot.as_ref() {
            if c.status().connected() {
                return Ok(c.clone());
            }
        }
        let c = call("open a channel", self.conn.create_channel())
            .await
            .map_err(|e| self.note(e))?;
        *slot = Some(c.clone());
        Ok(c)
    }

    /// Declares `amqp` idempotently (durable, with the arguments of `kind`) and returns its ready
    /// message count. A work queue that already exists as a classic queue (made by another client)
    /// is used as it is, with a warning: its redeliveries are then counted only as "redelivered".
    pub(crate) async fn declare(
        &self,
        amqp: &str,
        kind: QueueKind<'_>,
        expires: Option<Duration>,
    ) -> Result<u64, BrokerError> {
        let name = short(amqp)?;
        let mut args = FieldTable::default();
        match kind {
            QueueKind::Work => {
                args.insert("x-queue-type".into(), lstr("quorum"));
            }
            QueueKind::Level { ttl_ms, dlx } => {
                args.insert("x-queue-type".into(), lstr("classic"));
                args.insert(
                    "x-message-ttl".into(),
                    AMQPValue::LongLongInt(ttl_ms.min(i64::MAX as u64) as i64),
                );
                // No dead-letter routing key: the message keeps its own, which spells its delay.
                args.insert("x-dead-letter-exchange".into(), lstr(dlx));
            }
            QueueKind::Plain => {
                args.insert("x-queue-type".into(), lstr("classic"));
            }
        }
        if let Some(e) = expires {
            args.insert(
                "x-expires".into(),
                AMQPValue::LongLongInt(e.as_millis().clamp(1, i64::MAX as u128) as i64),
            );
        }
        let opts = QueueDeclareOptions {
            durable: true,
            ..QueueDeclareOptions::default()
        };
        let ch = self.admin().await?;
        let first = call(
            format!("declare queue {amqp}"),
            ch.queue_declare(name.clone(), opts, args),
        )
        .await;
        let count = match first {
            Ok(q) => q.message_count(),
            Err(e) if matches!(kind, QueueKind::Work) && is_inequivalent(&e) => {
                // Made by someone else with other arguments (a classic queue): use it as it is.
                let ch = self.admin().await?;
                let passive = QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                };
                let q = call(
                    format!("check existing queue {amqp}"),
                    ch.queue_declare(name, passive, FieldTable::default()),
                )
                .await
                .map_err(|e| self.note(e))?;
                if !self.is_declared(amqp) {
                    tracing::warn!(
                        queue = amqp,
                        "queue exists with other arguments (not a quorum queue); using it as it \
                         is: redeliveries are counted only as 'redelivered' (delivery count 2), so \
                         max attempts may be reached later than configured after crashes"
                    );
                }
                q.message_count()
            }
            Err(e) => return Err(self.note(e)),
        };
        self.declared().insert(amqp.to_string());
        Ok(u64::from(count))
    }

    /// Declares exchange `name` (durable) unless it was already declared on this connection.
    pub(crate) async fn ensure_exchange(
        &self,
        name: &str,
        kind: ExchangeKind<'_>,
    ) -> Result<(), BrokerError> {
        let key = format!("exchange {name}");
        if self.is_declared(&key) {
            return Ok(());
        }
        let mut args = FieldTable::default();
        let kind = match kind {
            ExchangeKind::Fanout => ExchangeKind_::Fanout,
            ExchangeKind::Headers { alternate } => {
                if let Some(a) = alternate {
                    args.insert("alternate-exchange".into(), lstr(a));
                }
                ExchangeKind_::Headers
            }
        };
        let opts = ExchangeDeclareOptions {
            durable: true,
            ..ExchangeDeclareOptions::default()
        };
        let ch = self.admin().await?;
        call(
            format!("declare exchange {name}"),
            ch.exchange_declare(short(name)?, kind, opts, args),
        )
        .await
        .map_err(|e| self.note(e))?;
        self.declared().insert(key);
        Ok(())
    }

    /// Whether exchange `name` exists (a passive declare on a channel of its own, since a 404
    /// closes the channel).
    pub(crate) async fn exchange_exists(&self, name: &str) -> Result<bool, BrokerError> {
        let ch = call("open a channel", self.conn.create_channel())
            .await
            .map_err(|e| self.note(e))?;
        let passive = ExchangeDeclareOptions {
            passive: true,
            ..ExchangeDeclareOptions::default()
        };
        let found = call(
            format!("check exchange {name}"),
            ch.exchange_declare(
                short(name)?,
                ExchangeKind_::Headers,
                passive,
                FieldTable::default(),
            ),
        )
        .await;
        match found {
            Ok(()) => {
                let _ = call("close", ch.close(200, "checked".into())).await;
                Ok(true)
            }
            Err(BrokerError::Other { message, .. })
                if message.contains("NOT-FOUND") || message.contains("NOT_FOUND") =>
            {
                Ok(false)
            }
            Err(e) => Err(self.note(e)),
        }
    }

    /// Binds `destination` (a queue or an exchange, per `bind`) to exchange `source` with binding
    /// `args` (and an empty routing key: the shared delay topology routes by headers or fans out)
    /// unless this connection already did.
    pub(crate) async fn ensure_binding(
        &self,
        bind: Bind,
        destination: &str,
        source: &str,
        args: FieldTable,
    ) -> Result<(), BrokerError> {
        let id = format!("bind {bind:?} {destination} {source} {args:?}");
        if self.is_declared(&id) {
            return Ok(());
        }
        let ch = self.admin().await?;
        let (dest, src, key) = (short(destination)?, short(source)?, ShortString::from(""));
        let what = format!("bind {destination} to {source}");
        let bound = match bind {
            Bind::Queue => {
                call(
                    what,
                    ch.queue_bind(dest, src, key, QueueBindOptions::default(), args),
                )
                .await
            }
            Bind::Exchange => {
                call(
                    what,
                    ch.exchange_bind(dest, src, key, ExchangeBindOptions::default(), args),
                )
                .await
            }
        };
        bound.map_err(|e| self.note(e))?;
        self.declared().insert(id);
        Ok(())
    }

    /// Declares `amqp` unless it was already declared on this connection.
    pub(crate) async fn ensure(
        &self,
        amqp: &str,
        kind: QueueKind<'_>,
        expires: Option<Duration>,
    ) -> Result<(), BrokerError> {
        if self.is_declared(amqp) {
            return Ok(());
        }
        self.declare(amqp, kind, expires).await.map(|_| ())
    }

    /// Publishes each `(properties, body)` to queue `amqp` through the default exchange (mandatory,
    /// so a missing queue is noticed) and returns once the broker confirmed every one. A nack, a
    /// returned message or a missing confirm fails the call (transient: the caller may retry; some
    /// messages may have been taken).
    pub(crate) async fn publish_confirmed(
        &self,
        amqp: &str,
        messages: Vec<(BasicProperties, Bytes)>,
    ) -> Result<(), BrokerError> {
        let key = short(amqp)?;
        let routed = messages
            .into_iter()
            .map(|(props, body)| (Route::Direct(key.clone()), props, body))
            .collect();
        self.publish_routed(amqp, routed).await
    }

    /// Publishes each `(route, properties, body)` (mandatory) and returns once the broker
    /// confirmed every one; errors as [`Link::publish_confirmed`]. `amqp` names the destination
    /// in errors (and is forgotten as declared when a message comes back unroutable).
    pub(crate) async fn publish_routed(
        &self,
        amqp: &str,
        messages: Vec<(Route, BasicProperties, Bytes)>,
    ) -> Result<(), BrokerError> {
        let opts = BasicPublishOptions {
            mandatory: true,
            ..BasicPublishOptions::default()
        };
        let mut confirms = Vec::with_capacity(messages.len());
        let mut via_delay = Vec::with_capacity(messages.len());
        for (route, mut props, body) in messages {
            let (exchange, key, hops) = route.resolve()?;
            via_delay.push(!exchange.as_str().is_empty());
            if !hops.is_empty() {
                let mut headers = props.headers().clone().unwrap_or_default();
                for (k, v) in hops {
                    headers.insert(ShortString::from(k), lstr(&v));
                }
                props = props.with_headers(headers);
            }
            let sent = self
                .publish
                .basic_publish(exchange, key, opts, &body, props)
                .await
                .map_err(|e| self.note(map(&e, &format!("publish to {amqp}"))))?;
            confirms.push(sent);
        }
        let results = tokio::time::timeout(CALL_TIMEOUT, join_all(confirms))
            .await
            .map_err(|_| {
                // Confirms lost in a stuck connection: start over on a fresh one.
                self.mark_broken();
                BrokerError::Timeout(CALL_TIMEOUT)
            })?;
        let mut returned = 0usize;
        let mut returned_delayed = 0usize;
        let mut nacked = 0usize;
        let mut nacked_delayed = 0usize;
        for (r, delayed) in results.into_iter().zip(via_delay) {
            match r {
                Ok(Confirmation::Ack(None)) => {}
                Ok(Confirmation::Ack(Some(_))) if delayed => returned_delayed += 1,
                Ok(Confirmation::Ack(Some(_))) => returned += 1,
                Ok(Confirmation::Nack(_)) if delayed => nacked_delayed += 1,
                Ok(Confirmation::Nack(_)) => nacked += 1,
                Ok(Confirmation::NotRequested) => {
                    self.mark_broken();
                    return Err(BrokerError::transient(
                        "publish channel lost confirm mode; reconnecting",
                    ));
                }
                Err(e) => return Err(self.note(map(&e, &format!("confirm of publish to {amqp}")))),
            }
        }
        if returned_delayed + nacked_delayed > 0 {
            // The level queue it was routed to took nothing: on a cluster, the node holding the
            // shared delay queues is down (a classic queue is on one node).
            return Err(BrokerError::transient(format!(
                "{} delayed message(s) for {amqp} returned or refused: the delay \
                 queues cannot take them (on a cluster, the node holding them is down); those \
                 were not enqueued",
                returned_delayed + nacked_delayed
            )));
        }
        if returned > 0 {
            self.forget(amqp);
            return Err(BrokerError::transient(format!(
                "{returned} message(s) returned unroutable: queue {amqp} does not exist (deleted?); \
                 it is declared again on the next call"
            )));
        }
        if nacked > 0 {
            return Err(BrokerError::transient(format!(
                "the broker refused {nacked} message(s) for {amqp} (publisher nack)"
            )));
        }
        Ok(())
    }
}

/// A resolved [`Route`]: exchange, routing key, and headers to add.
type Resolved = (ShortString, ShortString, Vec<(String, String)>);

/// Where one message goes.
pub(crate) enum Route {
    /// Straight to a queue, through the default exchange.
    Direct(ShortString),
    /// Through the delay levels' entry exchange, held until `not_before`; the delay is computed
    /// when the message is sent (so time spent publishing the rest of a batch, or declaring, is
    /// not added to it), and a message already due goes to queue `queue` directly.
    Delayed {
        entry: ShortString,
        queue: ShortString,
        not_before: SystemTime,
        levels: u32,
    },
}

impl Route {
    /// The exchange, the routing key, and the route headers to add.
    fn resolve(self) -> Result<Resolved, BrokerError> {
        match self {
            Route::Direct(q) => Ok((ShortString::from(""), q, Vec::new())),
            Route::Delayed {
                entry,
                queue,
                not_before,
                levels,
            } => {
                let left = not_before
                    .duration_since(SystemTime::now())
                    .unwrap_or_default();
                match crate::delay::delay_ms(left, levels) {
                    0 => Ok((ShortString::from(""), queue, Vec::new())),
                    ms => {
                        let hops = crate::delay::hops(ms)
                            .into_iter()
                            .map(|(k, next)| {
                                (crate::delay::hop_header(k), crate::delay::hop_value(next))
                            })
                            .collect();
                        Ok((entry, short(&crate::delay::routing_key(ms))?, hops))
                    }
                }
            }
        }
    }
}

/// SASL PLAIN with credentials kept out of the URI.
struct PlainAuth {
    user: String,
    password: String,
}

impl AuthProvider for PlainAuth {
    fn mechanism(&self) -> ShortString {
        ShortString::from("PLAIN")
    }

    fn auth_starter(&self) -> Result<LongString, String> {
        Ok(LongString::from(format!(
            "\0{}\0{}",
            self.user, self.password
        )))
    }
}

fn lstr(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s))
}

/// `s` as an AMQP short string, or a permanent error naming it.
pub(crate) fn short(s: &str) -> Result<ShortString, BrokerError> {
    ShortString::try_new(s).map_err(|_| BrokerError::InvalidQueue {
        queue: s.to_string(),
        reason: "AMQP names are at most 255 bytes".into(),
    })
}

/// Runs one AMQP call under [`CALL_TIMEOUT`], mapping its error.
pub(crate) async fn call<T>(
    what: impl std::fmt::Display,
    fut: impl std::future::Future<Output = lapin::Result<T>>,
) -> Result<T, BrokerError> {
    match tokio::time::timeout(CALL_TIMEOUT, fut).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(map(&e, &what.to_string())),
        Err(_) => Err(BrokerError::Timeout(CALL_TIMEOUT)),
    }
}

/// The AMQP error inside a lapin error, if it is one.
pub(crate) fn amqp_error(e: &lapin::Error) -> Option<&lapin::protocol::AMQPError> {
    match e.kind() {
        ErrorKind::ProtocolError(a) => Some(a),
        _ => None,
    }
}

fn is_node_down_text(text: &str) -> bool {
    text.contains("home node") && text.contains("down or inaccessible")
}

/// Whether `e` is RabbitMQ refusing a classic queue because the cluster node that holds it is
/// down (`NOT_FOUND - home node ... is down or inaccessible`).
pub(crate) fn is_node_down(e: &BrokerError) -> bool {
    is_node_down_text(&e.to_string())
}

fn is_inequivalent(e: &BrokerError) -> bool {
    matches!(e, BrokerError::Other { message, .. } if message.contains("PRECONDITION") && message.contains("inequivalent"))
}

/// Maps a lapin error: broken connections and channels are [`BrokerError::Connection`]
/// (transient: reconnect and retry), refusals by the broker are permanent. Never contains the URL.
pub(crate) fn map(e: &lapin::Error, what: &str) -> BrokerError {
    match e.kind() {
        ErrorKind::ProtocolError(a) => {
            let text = format!("{what}: {a}");
            match a.kind() {
                AMQPErrorKind::Soft(AMQPSoftError::RESOURCELOCKED) => BrokerError::transient(text),
                // A classic queue whose cluster node is down: it is back when the node is.
                AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND) if is_node_down_text(&text) => {
                    BrokerError::transient(text)
                }
                AMQPErrorKind::Soft(_) => BrokerError::permanent(text),
                AMQPErrorKind::Hard(AMQPHardError::NOTALLOWED | AMQPHardError::INVALIDPATH) => {
                    BrokerError::permanent(text)
                }
                AMQPErrorKind::Hard(_) => BrokerError::Connection(text),
            }
        }
        ErrorKind::InvalidProtocolVersion(_)
        | ErrorKind::SerialisationError(_)
        | ErrorKind::AuthProviderError(_)
        | ErrorKind::NoDefaultRuntime
        | ErrorKind::FutureCompleted => BrokerError::permanent(format!("{what}: {e}")),
        _ => BrokerError::Connection(format!("{what}: {e}")),
    }
}

fn connect_error(e: &lapin::Error, redacted: &str) -> BrokerError {
    let refused = amqp_error(e).is_some_and(|a| {
        matches!(
            a.kind(),
            AMQPErrorKind::Soft(AMQPSoftError::ACCESSREFUSED)
                | AMQPErrorKind::Hard(AMQPHardError::NOTALLOWED)
        )
    });
    if refused {
        BrokerError::permanent(format!(
            "{redacted} refused the login or the vhost: {e} (check the user, password and vhost)"
        ))
    } else {
        BrokerError::Connection(format!("cannot connect to {redacted}: {e}"))
    }
}
