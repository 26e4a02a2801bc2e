//! The sovereign inference gateway.
//!
//! Today this crate holds only the domain vocabulary shared by the gateway's phases; the
//! pingora front end, federated auth, Cedar policy, routing and audit arrive with issues
//! 3 and 4 (see docs/architecture.md).

use std::fmt;
use std::str::FromStr;

/// How sensitive a request's data is. Ordered: `Public < Internal < Restricted`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Classification {
    Public,
    Internal,
    Restricted,
}

impl FromStr for Classification {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "public" => Ok(Self::Public),
            "internal" => Ok(Self::Internal),
            "restricted" => Ok(Self::Restricted),
            other => Err(format!("unknown data classification `{other}`")),
        }
    }
}

impl fmt::Display for Classification {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Public => "public",
            Self::Internal => "internal",
            Self::Restricted => "restricted",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classification_order_and_parse() {
        assert!(Classification::Public < Classification::Internal);
        assert!(Classification::Internal < Classification::Restricted);
        for c in [
            Classification::Public,
            Classification::Internal,
            Classification::Restricted,
        ] {
            assert_eq!(c.to_string().parse::<Classification>(), Ok(c));
        }
        assert!("secret".parse::<Classification>().is_err());
    }
}
