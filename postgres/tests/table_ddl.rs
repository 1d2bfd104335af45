//! A table's definition made on another database from the catalog of the one that has it
//! (what a node joining a mesh gets): identity, serial and generated columns, collations,
//! defaults, keys, unique, check and foreign-key constraints, partial indexes and the replica
//! identity come out the same, described by the server on both sides.
#![allow(clippy::unwrap_used)]

use synapse_localpg::{ClusterOptions, LocalCluster};

const SCHEMA: &str = r#"
CREATE SCHEMA shop;
CREATE TABLE shop.customers (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    email text NOT NULL,
    name text COLLATE "C",
    created timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT email_lower CHECK (email = lower(email)));
CREATE UNIQUE INDEX customers_email ON shop.customers (email);
CREATE TABLE shop.orders (
    id serial PRIMARY KEY,
    customer bigint NOT NULL REFERENCES shop.customers (id) ON DELETE CASCADE,
    qty int NOT NULL DEFAULT 1,
    price numeric(10, 2),
    total numeric GENERATED ALWAYS AS (qty * price) STORED,
    note varchar(40),
    UNIQUE (customer, note));
CREATE INDEX orders_big ON shop.orders (qty) WHERE qty > 10;
ALTER TABLE shop.orders REPLICA IDENTITY FULL;
CREATE TABLE shop.audit (id int PRIMARY KEY, order_id int REFERENCES shop.orders (id));
"#;

/// Every column, constraint, index and replica identity of schema `shop`, as the server renders them.
const DESCRIBE: &str = r#"
SELECT string_agg(x, E'\n' ORDER BY x) FROM (
  SELECT c.relname || '.' || a.attname || ' ' || format_type(a.atttypid, a.atttypmod) || ' notnull=' || a.attnotnull
         || ' default=' || coalesce(pg_get_expr(d.adbin, d.adrelid), '-') || ' identity=' || a.attidentity::text
         || ' generated=' || a.attgenerated::text || ' collation=' || coalesce(a.attcollation::regcollation::text, '-')
    FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
   WHERE c.relnamespace = 'shop'::regnamespace AND c.relkind = 'r' AND a.attnum > 0 AND NOT a.attisdropped
  UNION ALL
  SELECT conrelid::regclass::text || ' ' || conname || ' ' || pg_get_constraintdef(oid) FROM pg_constraint
   WHERE connamespace = 'shop'::regnamespace
  UNION ALL
  SELECT indexdef FROM pg_indexes WHERE schemaname = 'shop'
  UNION ALL
  SELECT relname || ' replica identity ' || relreplident::text FROM pg_class WHERE relnamespace = 'shop'::regnamespace AND relkind = 'r'
) AS s(x)
"#;

#[tokio::test]
async fn a_tables_definition_is_made_the_same_elsewhere() {
    let cluster = LocalCluster::start(ClusterOptions::default()).unwrap();
    cluster.create_database("donor").unwrap();
    cluster.create_database("joiner").unwrap();
    cluster.psql("donor", SCHEMA).unwrap();
    let donor = synapse_postgres::connect_str(&cluster.url("donor"), "test").await.unwrap();
    let joiner = synapse_postgres::connect_str(&cluster.url("joiner"), "test").await.unwrap();
    // Listed before the table it references: foreign keys come after every table; the audit
    // table's reference to a table outside the set is left out.
    let tables = ["shop.orders".to_owned(), "shop.customers".to_owned()];
    let statements = synapse_postgres::table_ddl::create_statements(&donor, &tables).await.unwrap();
    joiner.batch_execute(&statements.join(";\n")).await.unwrap();
    let want =
        cluster.psql("donor", &DESCRIBE.replace("'r' AND a.attnum", "'r' AND c.relname <> 'audit' AND a.attnum"));
    let want: String = want
        .unwrap()
        .lines()
        .filter(|l| !l.starts_with("audit") && !l.starts_with("shop.audit") && !l.contains("ON shop.audit "))
        .collect::<Vec<_>>()
        .join("\n");
    let got = cluster.psql("joiner", DESCRIBE).unwrap();
    assert_eq!(got, want, "statements:\n{}", statements.join(";\n"));
    assert!(
        got.contains("orders_customer_fkey FOREIGN KEY (customer) REFERENCES shop.customers(id) ON DELETE CASCADE"),
        "{got}"
    );
    assert!(got.contains("orders replica identity f"), "{got}");

    // Rows go in as on the donor: identity and serial columns generate, the generated one computes.
    cluster.psql("joiner", "INSERT INTO shop.customers (email) VALUES ('a@x'); INSERT INTO shop.orders (customer, qty, price) VALUES (1, 3, 2.5)").unwrap();
    assert_eq!(cluster.psql("joiner", "SELECT id || ':' || total FROM shop.orders").unwrap(), "1:7.50");
    let refused = cluster.psql("joiner", "INSERT INTO shop.customers (email) VALUES ('B@x')");
    assert!(refused.is_err_and(|e| e.to_string().contains("email_lower")), "the check constraint was not made");
}
