//! Delivers the change stream outside SynapseDB.
//!
//! ```text
//!            ┌──────────────────────────── per source node ──────────────────────────┐
//!  log ──▶ ChangeFeed (committed txns only, cursor-resumable, table/op/row filters)
//!            ├──▶ streams:  GET /v1/streams/{node}/changes  (JSON lines or SSE; the client
//!            │              holds the cursor; 410 when retention passed it)
//!            ├──▶ webhooks: Dispatcher per endpoint ──▶ HttpSink (Standard Webhooks signed)
//!            │              position kept in the log as consumer `webhook:<endpoint>`
//!            └──▶ Kafka topics: TopicPublisher ──▶ `<prefix>.<schema>.<table>` (Debezium
//!                           layout, CloudEvents headers) + transaction metadata topic
//! ```
//!
//! [`ChangeFeed`] is the boundary every connector reads through. Its contract:
//! * **Visibility**: only committed transactions, in commit order; within one, change order.
//! * **Resumption**: a feed opened after a cursor yields exactly the events after it — none
//!   missing, none repeated — or fails with `CursorGone` if retention deleted some.
//! * **Identity**: an event's `id` (`<node>/<cursor>`) is the same on every delivery.
//!
//! Webhook delivery is at-least-once with a stable `webhook-id`; see [`webhook::dispatcher::Dispatcher`]
//! for its ordering modes, retries and dead letters.

pub mod api;
pub mod auth;
mod error;
pub mod feed;
pub mod filter;
pub mod kafka_topics;
pub mod openapi;
pub mod snapshot;
pub mod vector;
pub mod webhook;

pub use error::ConnectorError;
pub use feed::{ChangeFeed, Event, FeedBatch, Operation, Selector, SourceInfo, TxnEnd};
pub use filter::RowFilter;
