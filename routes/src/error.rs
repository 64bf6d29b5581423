//! Errors of loading a route file: unreadable files and every validation failure found.

use std::fmt;

/// One problem found in a route file, located down to the field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidationError {
    /// The file the problem is in, as given by the operator.
    pub file: String,
    /// Where in the file: `routes[2] "orders"`, `backends.orders`, `defaults`, or empty for the top.
    pub location: String,
    /// The field at fault within that location, such as `to` or `match.path_regex`.
    pub field: String,
    /// What is wrong with it.
    pub message: String,
}

impl fmt::Display for ValidationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:", self.file)?;
        if !self.location.is_empty() {
            write!(f, " {}:", self.location)?;
        }
        if !self.field.is_empty() {
            write!(f, " {}:", self.field)?;
        }
        write!(f, " {}", self.message)
    }
}

/// Why a route file could not be turned into a route table.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The file could not be read or is not well-formed TOML, YAML or JSON.
    #[error("{file}: {message}")]
    Unreadable { file: String, message: String },
    /// The file parsed but breaks one or more rules; every problem found is listed.
    #[error("{}", display_all(.0))]
    Invalid(Vec<ValidationError>),
}

impl LoadError {
    /// Every problem as its own line, for `routes check` and the admin API.
    pub fn messages(&self) -> Vec<String> {
        match self {
            LoadError::Unreadable { .. } => vec![self.to_string()],
            LoadError::Invalid(errors) => errors.iter().map(ToString::to_string).collect(),
        }
    }
}

fn display_all(errors: &[ValidationError]) -> String {
    errors.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n")
}
