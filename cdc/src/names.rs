//! Table names: parsing `schema.table` as configured (SQL quoting for names with dots,
//! quotes or capitals), quoting them for SQL, and the Kafka topic each table maps to, with
//! the check that no two tables share one.

use std::collections::HashMap;
use std::fmt;

/// A schema-qualified table name, exactly as PostgreSQL stores it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TableName {
    pub schema: String,
    pub name: String,
}

impl TableName {
    pub fn new(schema: impl Into<String>, name: impl Into<String>) -> TableName {
        TableName { schema: schema.into(), name: name.into() }
    }

    /// Parses `table`, `schema.table` or their quoted forms (`"a.b".c`, `public."Foo Bar"`,
    /// `""` for a quote inside quotes). Unquoted names are taken as written; a name without
    /// schema is in `public`.
    pub fn parse(text: &str) -> Result<TableName, String> {
        let mut parts: Vec<String> = Vec::new();
        let mut chars = text.chars().peekable();
        loop {
            let mut part = String::new();
            if chars.peek() == Some(&'"') {
                chars.next();
                loop {
                    match chars.next() {
                        Some('"') if chars.peek() == Some(&'"') => {
                            chars.next();
                            part.push('"');
                        }
                        Some('"') => break,
                        Some(c) => part.push(c),
                        None => return Err(format!("{text:?}: unterminated quoted name")),
                    }
                }
                if !matches!(chars.peek(), None | Some('.')) {
                    return Err(format!("{text:?}: a quoted name must end at a dot"));
                }
            } else {
                while let Some(&c) = chars.peek() {
                    if c == '.' {
                        break;
                    }
                    if c == '"' {
                        return Err(format!("{text:?}: quote a name as a whole (\"a.b\".c)"));
                    }
                    part.push(c);
                    chars.next();
                }
            }
            if part.is_empty() {
                return Err(format!("{text:?}: empty name"));
            }
            parts.push(part);
            if chars.next().is_none() {
                break;
            }
        }
        match <[String; 2]>::try_from(parts) {
            Ok([schema, name]) => Ok(TableName { schema, name }),
            Err(parts) if parts.len() == 1 => Ok(TableName::new("public", parts[0].clone())),
            Err(_) => Err(format!("{text:?}: expected table or schema.table")),
        }
    }

    /// `"schema"."table"`, for SQL.
    pub fn sql(&self) -> String {
        format!("{}.{}", quote_ident(&self.schema), quote_ident(&self.name))
    }

    /// `<prefix>.<schema>.<table>`, with characters Kafka does not allow in topic names
    /// replaced by `_`, as Debezium does.
    pub fn topic(&self, prefix: &str) -> String {
        format!("{prefix}.{}.{}", self.schema, self.name)
            .chars()
            .map(
                |c| if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') { c } else { '_' },
            )
            .collect()
    }
}

/// Quotes an identifier for SQL and replication commands.
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Quotes a value as an SQL string literal, as PostgreSQL's `quote_literal` does: right
/// under either setting of `standard_conforming_strings`, since one holding a backslash is
/// written as an escape string (`E'a\\b'`).
pub fn quote_literal(value: &str) -> String {
    let quoted = value.replace('\'', "''");
    if value.contains('\\') {
        format!("E'{}'", quoted.replace('\\', "\\\\"))
    } else {
        format!("'{quoted}'")
    }
}

impl fmt::Display for TableName {
    /// `schema.table`, each part quoted when it would not read back as written.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let plain = |s: &str| !s.is_empty() && !s.contains(['.', '"']);
        let part = |s: &str| if plain(s) { s.to_string() } else { quote_ident(s) };
        write!(f, "{}.{}", part(&self.schema), part(&self.name))
    }
}

/// Two tables whose topics Kafka cannot tell apart: each table with its topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicCollision {
    pub first: (TableName, String),
    pub second: (TableName, String),
}

/// Which table owns each topic; refuses a second table on a topic already taken.
#[derive(Debug, Default)]
pub struct Topics {
    /// By the topic with `.` as `_`: Kafka refuses topics that differ only there, since
    /// its metric names do not tell them apart.
    owners: HashMap<String, (TableName, String)>,
}

impl Topics {
    /// The topic of `table`, claimed for it.
    pub fn claim(
        &mut self,
        prefix: &str,
        table: &TableName,
    ) -> Result<String, Box<TopicCollision>> {
        let topic = table.topic(prefix);
        let alike = topic.replace('.', "_");
        match self.owners.get(&alike) {
            Some((owner, owned)) if owner != table => Err(Box::new(TopicCollision {
                first: (owner.clone(), owned.clone()),
                second: (table.clone(), topic),
            })),
            Some(_) => Ok(topic),
            None => {
                self.owners.insert(alike, (table.clone(), topic.clone()));
                Ok(topic)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<(String, String), String> {
        TableName::parse(text).map(|t| (t.schema, t.name))
    }

    fn pair(schema: &str, name: &str) -> Result<(String, String), String> {
        Ok((schema.to_string(), name.to_string()))
    }

    #[test]
    fn names_parse_with_and_without_quotes() {
        assert_eq!(parse("orders"), pair("public", "orders"));
        assert_eq!(parse("shop.orders"), pair("shop", "orders"));
        assert_eq!(parse("Shop.Orders"), pair("Shop", "Orders"), "unquoted is as written");
        assert_eq!(parse("\"a.b\".c"), pair("a.b", "c"));
        assert_eq!(parse("a.\"b.c\""), pair("a", "b.c"));
        assert_eq!(parse("public.\"Foo Bar\""), pair("public", "Foo Bar"));
        assert_eq!(parse("\"say \"\"hi\"\"\""), pair("public", "say \"hi\""));
        for bad in ["", "a.", ".a", "a.b.c", "\"a", "\"a\"b", "a\"b\"", "\"\".a"] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn names_display_and_quote_back_to_themselves() {
        for text in ["shop.orders", "\"a.b\".c", "public.\"x\"\"y\""] {
            let name = TableName::parse(text).expect("parses");
            assert_eq!(name.to_string(), text);
            assert_eq!(TableName::parse(&name.to_string()), Ok(name));
        }
        assert_eq!(TableName::new("a.b", "c\"d").sql(), "\"a.b\".\"c\"\"d\"");
    }

    #[test]
    fn literals_are_quoted_as_postgres_does() {
        assert_eq!(quote_literal("plain"), "'plain'");
        assert_eq!(quote_literal("it's"), "'it''s'");
        assert_eq!(quote_literal("a\\b'c"), "E'a\\\\b''c'");
    }

    #[test]
    fn tables_sharing_a_topic_are_refused() {
        let mut topics = Topics::default();
        let ab_c = TableName::new("a.b", "c");
        assert_eq!(topics.claim("p", &ab_c), Ok("p.a.b.c".to_string()));
        assert_eq!(topics.claim("p", &ab_c), Ok("p.a.b.c".to_string()), "the same table again");
        let collision = topics.claim("p", &TableName::new("a", "b.c")).expect_err("collides");
        assert_eq!(collision.first, (ab_c, "p.a.b.c".to_string()));
        assert_eq!(collision.second.1, "p.a.b.c");
        assert!(topics.claim("p", &TableName::new("public", "Foo Bar")).is_ok());
        assert!(topics.claim("p", &TableName::new("public", "Foo_Bar")).is_err());
        // Kafka refuses topics that differ only in '.' against '_'.
        assert!(topics.claim("p", &TableName::new("public", "a_b")).is_ok());
        let collision = topics.claim("p", &TableName::new("public", "a.b")).expect_err("collides");
        assert_eq!(collision.second.1, "p.public.a.b");
        assert_eq!(TableName::new("public", "Foo Bar").topic("p"), "p.public.Foo_Bar");
    }
}
