//! Columns that must never leave the process: per table, columns excluded from every event,
//! and columns masked, by a salted SHA-256 (stable, so that joins on it still work) or
//! redacted. Compiled once from the configuration with every error collected, checked
//! against each table's columns when the table is met, and applied by [`crate::event`] to
//! snapshot and stream alike, before anything is encoded.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::event::Table;
use crate::names::TableName;

/// What the configuration says of one table's columns (`[columns."schema.table"]`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ColumnRules {
    /// Columns left out of every event.
    #[serde(default)]
    pub exclude: Vec<String>,
    /// Columns whose values are replaced.
    #[serde(default)]
    pub mask: BTreeMap<String, MaskKind>,
}

/// How a masked column's values are replaced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MaskKind {
    /// The hex SHA-256 of the salt and the value's text: the same value always gives the
    /// same hash, so it still joins; without the salt it cannot be looked up in a table of
    /// hashes of likely values.
    Hash,
    /// `"***"`.
    Redact,
}

/// What happens to one column of a table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mask {
    Keep,
    Exclude,
    Hash(Arc<[u8]>),
    Redact,
}

/// What redacted values become.
pub const REDACTED: &str = "***";

/// The rules of every configured table, compiled.
#[derive(Debug, Clone, Default)]
pub struct Masking {
    tables: Vec<(TableName, ColumnRules)>,
    salt: Option<Arc<[u8]>>,
}

impl Masking {
    /// Compiles the `[columns]` rules; `salt` is the content of `masking.salt_file`. Every
    /// problem is reported, each naming its key.
    pub fn compile(
        columns: &BTreeMap<String, ColumnRules>,
        salt: Option<Vec<u8>>,
    ) -> Result<Masking, Vec<String>> {
        let mut errors = Vec::new();
        let mut tables = Vec::new();
        for (name, rules) in columns {
            let key = format!("columns.\"{name}\"");
            let table = match TableName::parse(name) {
                Ok(table) => table,
                Err(e) => {
                    errors.push(format!("{key}: {e}"));
                    continue;
                }
            };
            for column in rules.mask.keys().filter(|c| rules.exclude.contains(c)) {
                errors.push(format!("{key}: column \"{column}\" is both excluded and masked"));
            }
            let hashes = rules.mask.values().any(|kind| *kind == MaskKind::Hash);
            if hashes && salt.is_none() {
                errors.push(format!(
                    "{key}: mask = \"hash\" needs masking.salt_file (a secret of at least 16 bytes)"
                ));
            }
            tables.push((table, rules.clone()));
        }
        if salt.as_ref().is_some_and(|salt| salt.len() < 16) {
            errors.push("masking.salt_file: the salt must be at least 16 bytes".into());
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        Ok(Masking { tables, salt: salt.map(Arc::from) })
    }

    /// What happens to each column of `table`, in order. A rule naming a column the table
    /// does not stream is an error (a typo would otherwise let the column out), and so is
    /// excluding a key column (the events' key would be incomplete).
    pub fn masks(&self, table: &Table) -> Result<Vec<Mask>, String> {
        let name = TableName::new(&table.relation.namespace, &table.relation.name);
        let Some((_, rules)) = self.tables.iter().find(|(configured, _)| *configured == name)
        else {
            return Ok(Vec::new());
        };
        let columns = &table.relation.columns;
        let named: Vec<&String> = rules.exclude.iter().chain(rules.mask.keys()).collect();
        let missing: Vec<&&String> =
            named.iter().filter(|c| !columns.iter().any(|col| &&col.name == *c)).collect();
        if !missing.is_empty() {
            let have: Vec<&str> = columns.iter().map(|c| c.name.as_str()).collect();
            return Err(format!(
                "columns.\"{name}\": {name} streams no column {} (it streams {})",
                missing.iter().map(|c| format!("\"{c}\"")).collect::<Vec<_>>().join(", "),
                have.join(", ")
            ));
        }
        let mut masks = Vec::with_capacity(columns.len());
        for (index, column) in columns.iter().enumerate() {
            let mask = if rules.exclude.contains(&column.name) {
                if table.key.contains(&index) {
                    return Err(format!(
                        "columns.\"{name}\": \"{}\" is part of the key, which every event carries: mask it instead of excluding it",
                        column.name
                    ));
                }
                Mask::Exclude
            } else {
                match rules.mask.get(&column.name) {
                    Some(MaskKind::Hash) => match &self.salt {
                        Some(salt) => Mask::Hash(salt.clone()),
                        None => return Err("masking.salt_file is required".into()),
                    },
                    Some(MaskKind::Redact) => Mask::Redact,
                    None => Mask::Keep,
                }
            };
            masks.push(mask);
        }
        Ok(masks)
    }
}

/// The hash a `hash` mask gives `value`: hex SHA-256 of the salt, then the value.
pub fn hash(salt: &[u8], value: &[u8]) -> String {
    let digest = Sha256::new().chain_update(salt).chain_update(value).finalize();
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pgoutput::{Column, Relation};
    use crate::value::ValueType;

    fn table() -> Table {
        let column = |name: &str| Column {
            is_key: name == "id",
            name: name.into(),
            type_oid: 25,
            type_modifier: -1,
        };
        let columns = vec![column("id"), column("email"), column("ssn"), column("phone")];
        Table {
            relation: Relation {
                id: 1,
                namespace: "public".into(),
                name: "customers".into(),
                replica_identity: b'd',
                columns,
            },
            types: vec![ValueType::Scalar(25); 4],
            key: vec![0],
            topic: "shop.public.customers".into(),
            masks: Vec::new(),
        }
    }

    fn rules(exclude: &[&str], mask: &[(&str, MaskKind)]) -> BTreeMap<String, ColumnRules> {
        let rules = ColumnRules {
            exclude: exclude.iter().map(|c| c.to_string()).collect(),
            mask: mask.iter().map(|(c, k)| (c.to_string(), *k)).collect(),
        };
        BTreeMap::from([("public.customers".to_string(), rules)])
    }

    const SALT: &[u8] = b"0123456789abcdef";

    #[test]
    fn each_column_gets_its_rule() {
        let masking = Masking::compile(
            &rules(&["ssn"], &[("email", MaskKind::Hash), ("phone", MaskKind::Redact)]),
            Some(SALT.to_vec()),
        )
        .expect("valid");
        let masks = masking.masks(&table()).expect("columns exist");
        assert_eq!(masks, [Mask::Keep, Mask::Hash(SALT.into()), Mask::Exclude, Mask::Redact]);
        let mut other = table();
        other.relation.name = "orders".into();
        assert_eq!(masking.masks(&other), Ok(Vec::new()), "no rules: every column kept");
    }

    #[test]
    fn every_configuration_error_is_named() {
        let columns = BTreeMap::from([
            (
                "public.customers".to_string(),
                rules(&["email"], &[("email", MaskKind::Hash)])["public.customers"].clone(),
            ),
            ("a.b.c".to_string(), ColumnRules::default()),
        ]);
        let errors = Masking::compile(&columns, None).expect_err("invalid");
        assert_eq!(errors.len(), 3, "{errors:?}");
        assert!(errors.iter().any(|e| e.starts_with("columns.\"a.b.c\"")), "{errors:?}");
        assert!(errors.iter().any(|e| e.contains("both excluded and masked")), "{errors:?}");
        assert!(errors.iter().any(|e| e.contains("needs masking.salt_file")), "{errors:?}");
        let short = Masking::compile(&BTreeMap::new(), Some(b"short".to_vec())).expect_err("short");
        assert!(short[0].contains("at least 16 bytes"), "{short:?}");
    }

    #[test]
    fn a_typo_or_an_excluded_key_is_refused_when_the_table_is_met() {
        let typo = Masking::compile(&rules(&["snn"], &[]), None).expect("valid");
        let error = typo.masks(&table()).expect_err("no such column");
        assert!(
            error.contains("streams no column \"snn\"") && error.contains("id, email, ssn, phone"),
            "{error}"
        );
        let key = Masking::compile(&rules(&["id"], &[]), None).expect("valid");
        assert!(key.masks(&table()).expect_err("key").contains("part of the key"));
    }

    #[test]
    fn hashes_are_stable_and_salted() {
        let one = hash(SALT, b"ada@example.com");
        assert_eq!(one, hash(SALT, b"ada@example.com"));
        assert_eq!(one.len(), 64);
        assert_ne!(one, hash(b"fedcba9876543210", b"ada@example.com"));
        assert_ne!(one, hash(SALT, b"grace@example.com"));
    }
}
