//! A vector index kept in sync with a table's vector column from the change stream, answering
//! nearest-neighbour queries (issue 22; docs/decisions/0019-vector-index.md). `store` is one
//! index on disk (HNSW in LMDB, the stream position in the same transaction); `row` reads a
//! row's vector, key and filter values from the forms PostgreSQL and the stream give them;
//! `maintain` turns the stream's events into the store's batches and follows the stream;
//! `rows` reads the found rows' current values from the source.

pub mod maintain;
pub mod row;
pub mod rows;
pub mod store;
