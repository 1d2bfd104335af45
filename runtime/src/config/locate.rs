//! The line of a field in the configuration file, for error messages: `sources[1].url` →
//! the line of that `url:` key. serde keeps no positions once a value is deserialized, so the
//! text is parsed a second time into a tree of keys with their lines (yaml-rust2's marked
//! events, toml_edit's spans). A field that is absent points at the nearest entry that holds it.

use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
use yaml_rust2::scanner::Marker;

/// A node of the file with the line it starts on.
#[derive(Debug)]
struct Node {
    line: usize,
    kind: Kind,
}

#[derive(Debug)]
enum Kind {
    Map(Vec<(String, Node)>),
    Seq(Vec<Node>),
    Leaf,
}

/// The line (1-based) of `field` in `text`, or of the deepest enclosing entry that exists.
pub fn line_of(text: &str, is_toml: bool, field: &str) -> Option<usize> {
    let root = if is_toml { toml_tree(text)? } else { yaml_tree(text)? };
    let mut node = &root;
    let mut line = None;
    let segments = segments(field);
    let mut i = 0;
    'walk: while i < segments.len() {
        match (&node.kind, &segments[i]) {
            (Kind::Seq(items), Segment::Index(n)) => match items.get(*n) {
                Some(item) => {
                    node = item;
                    line = Some(item.line);
                    i += 1;
                }
                None => break,
            },
            (Kind::Map(entries), Segment::Key(_)) => {
                // Keys may hold dots themselves (`mesh.columns.public.accounts`): try the
                // longest run of key segments first.
                let run = segments[i..].iter().take_while(|s| matches!(s, Segment::Key(_))).count();
                for len in (1..=run).rev() {
                    let key: Vec<&str> = segments[i..i + len]
                        .iter()
                        .map(|s| match s {
                            Segment::Key(k) => k.as_str(),
                            Segment::Index(_) => "",
                        })
                        .collect();
                    let key = key.join(".");
                    if let Some((_, child)) = entries.iter().find(|(k, _)| *k == key) {
                        node = child;
                        line = Some(child.line);
                        i += len;
                        continue 'walk;
                    }
                }
                break;
            }
            _ => break,
        }
    }
    line.or(Some(root.line)).filter(|l| *l > 0)
}

#[derive(Debug, PartialEq)]
enum Segment {
    Key(String),
    Index(usize),
}

/// `a.b[2].c` → Key(a), Key(b), Index(2), Key(c).
fn segments(field: &str) -> Vec<Segment> {
    let mut out = Vec::new();
    for part in field.split('.') {
        let (name, rest) = part.split_once('[').map_or((part, ""), |(n, r)| (n, r));
        if !name.is_empty() {
            out.push(Segment::Key(name.to_owned()));
        }
        for index in rest.split('[') {
            if let Ok(n) = index.trim_end_matches(']').parse() {
                out.push(Segment::Index(n));
            }
        }
    }
    out
}

/// Builds the tree from yaml-rust2's events; a key's node takes the key's line.
#[derive(Default)]
struct YamlBuilder {
    /// Open collections, with the pending key of an open map.
    stack: Vec<(Node, Option<(String, usize)>)>,
    root: Option<Node>,
}

impl YamlBuilder {
    /// Adds a finished node (`text`: a scalar's value, which may be a map's key).
    fn push_value(&mut self, node: Node, text: Option<String>) {
        let Some((parent, pending)) = self.stack.last_mut() else {
            self.root = Some(node);
            return;
        };
        match &mut parent.kind {
            Kind::Seq(items) => items.push(node),
            Kind::Map(entries) => match pending.take() {
                // The value of a key: it lives at the key's line.
                Some((key, line)) => entries.push((key, Node { line, kind: node.kind })),
                None => *pending = Some((text.unwrap_or_default(), node.line)),
            },
            Kind::Leaf => {}
        }
    }
}

impl MarkedEventReceiver for YamlBuilder {
    fn on_event(&mut self, ev: Event, mark: Marker) {
        let line = mark.line();
        match ev {
            Event::MappingStart(..) => self.stack.push((Node { line, kind: Kind::Map(Vec::new()) }, None)),
            Event::SequenceStart(..) => self.stack.push((Node { line, kind: Kind::Seq(Vec::new()) }, None)),
            Event::MappingEnd | Event::SequenceEnd => {
                if let Some((node, _)) = self.stack.pop() {
                    self.push_value(node, None);
                }
            }
            Event::Scalar(value, ..) => self.push_value(Node { line, kind: Kind::Leaf }, Some(value)),
            Event::Alias(_) => self.push_value(Node { line, kind: Kind::Leaf }, None),
            _ => {}
        }
    }
}

fn yaml_tree(text: &str) -> Option<Node> {
    let mut builder = YamlBuilder::default();
    Parser::new_from_str(text).load(&mut builder, false).ok()?;
    builder.root
}

fn toml_tree(text: &str) -> Option<Node> {
    let doc = toml_edit::ImDocument::parse(text).ok()?;
    let line_at = |span: Option<std::ops::Range<usize>>| {
        span.map_or(0, |s| text[..s.start.min(text.len())].matches('\n').count() + 1)
    };
    fn table(t: &toml_edit::Table, line_at: &dyn Fn(Option<std::ops::Range<usize>>) -> usize) -> Node {
        let entries = t
            .iter()
            .map(|(k, item)| {
                let key_line = t.key(k).map_or(0, |key| line_at(key.span()));
                let mut node = item_node(item, line_at);
                if key_line > 0 {
                    node.line = key_line;
                }
                (k.to_owned(), node)
            })
            .collect();
        Node { line: line_at(t.span()), kind: Kind::Map(entries) }
    }
    fn item_node(item: &toml_edit::Item, line_at: &dyn Fn(Option<std::ops::Range<usize>>) -> usize) -> Node {
        match item {
            toml_edit::Item::Table(t) => table(t, line_at),
            toml_edit::Item::ArrayOfTables(a) => {
                Node { line: line_at(a.span()), kind: Kind::Seq(a.iter().map(|t| table(t, line_at)).collect()) }
            }
            toml_edit::Item::Value(v) => value_node(v, line_at),
            toml_edit::Item::None => Node { line: 0, kind: Kind::Leaf },
        }
    }
    fn value_node(v: &toml_edit::Value, line_at: &dyn Fn(Option<std::ops::Range<usize>>) -> usize) -> Node {
        let line = line_at(v.span());
        match v {
            toml_edit::Value::Array(a) => {
                Node { line, kind: Kind::Seq(a.iter().map(|v| value_node(v, line_at)).collect()) }
            }
            toml_edit::Value::InlineTable(t) => {
                let entries = t
                    .iter()
                    .map(|(k, v)| {
                        let mut node = value_node(v, line_at);
                        if let Some(key) = t.key(k) {
                            node.line = line_at(key.span()).max(node.line.min(1));
                        }
                        (k.to_owned(), node)
                    })
                    .collect();
                Node { line, kind: Kind::Map(entries) }
            }
            _ => Node { line, kind: Kind::Leaf },
        }
    }
    let mut root = table(doc.as_table(), &line_at);
    root.line = 1;
    Some(root)
}

#[cfg(test)]
mod tests {
    use super::*;

    const YAML: &str = "\
sources:
  - name: a
    url: postgres://a
  - name: b
    url: postgres://b
mesh:
  columns:
    public.accounts: {hits: counter}
log:
  kafka:
    brokers: k:9092
    properties:
      sasl.mechanism: PLAIN
";

    #[test]
    fn yaml_fields_have_their_lines() {
        let at = |f: &str| line_of(YAML, false, f);
        assert_eq!(at("sources"), Some(1));
        assert_eq!(at("sources[0]"), Some(2));
        assert_eq!(at("sources[1].url"), Some(5));
        assert_eq!(at("sources[1].slot"), Some(4), "absent: the entry's line");
        assert_eq!(at("mesh.columns.public.accounts"), Some(8), "a key with dots");
        assert_eq!(at("log.kafka.properties"), Some(12));
        assert_eq!(at("log.kafka.brokers"), Some(11));
        assert_eq!(at("nothing.here"), Some(1));
    }

    #[test]
    fn toml_fields_have_their_lines() {
        let text = "[[sources]]\nname = \"a\"\nurl = \"x\"\n\n[[sources]]\nname = \"b\"\nurl = \"y\"\n\n[log.kafka]\nbrokers = \"k\"\n";
        let at = |f: &str| line_of(text, true, f);
        assert_eq!(at("sources[1].url"), Some(7));
        assert_eq!(at("sources[0].name"), Some(2));
        assert_eq!(at("log.kafka.brokers"), Some(10));
    }
}
