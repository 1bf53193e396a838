//! [`SchemaVersion`]: the version of a job or event contract, `MAJOR.MINOR`.
//!
//! On the wire a version is an integer (`1`, the form other systems have always
//! published, meaning `1.0`) or a string `"MAJOR.MINOR"` (`"1.3"`). A reader
//! accepts every minor version of the majors it reads: a newer minor version only
//! adds optional fields and enum values, which readers ignore or keep as
//! `unknown`. A major version it does not read is refused with that reason (a job
//! is dead-lettered, an event parked), never dropped.

use serde::{de, Deserialize, Deserializer, Serialize, Serializer};

/// A contract version, `MAJOR.MINOR`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SchemaVersion {
    /// Incompatible changes.
    pub major: u32,
    /// Compatible additions (optional fields, enum values).
    pub minor: u32,
}

impl SchemaVersion {
    /// The version this build writes: 1.0.
    pub const CURRENT: SchemaVersion = SchemaVersion { major: 1, minor: 0 };

    /// A version.
    pub const fn new(major: u32, minor: u32) -> Self {
        Self { major, minor }
    }

    /// Can this build read a message of this version? (Same major; any minor.)
    pub fn readable(self) -> bool {
        self.major == Self::CURRENT.major
    }

    /// Is this the version written when the field is left out (1.0)?
    pub fn is_current(&self) -> bool {
        *self == Self::CURRENT
    }
}

impl Default for SchemaVersion {
    fn default() -> Self {
        Self::CURRENT
    }
}

impl std::fmt::Display for SchemaVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

impl std::str::FromStr for SchemaVersion {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || format!("{:?} is not a schema version (MAJOR or \"MAJOR.MINOR\")", s.chars().take(40).collect::<String>());
        let (major, minor) = s.split_once('.').unwrap_or((s, "0"));
        let num = |p: &str| if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) { p.parse::<u32>().ok() } else { None };
        Ok(Self { major: num(major).ok_or_else(bad)?, minor: num(minor).ok_or_else(bad)? })
    }
}

impl Serialize for SchemaVersion {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if self.minor == 0 {
            s.serialize_u32(self.major)
        } else {
            s.collect_str(self)
        }
    }
}

impl<'de> Deserialize<'de> for SchemaVersion {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl de::Visitor<'_> for V {
            type Value = SchemaVersion;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a schema version: an integer MAJOR or a string \"MAJOR.MINOR\"")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<SchemaVersion, E> {
                let major = u32::try_from(v).map_err(|_| E::custom(format!("schema version {v} is out of range")))?;
                Ok(SchemaVersion { major, minor: 0 })
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<SchemaVersion, E> {
                match u64::try_from(v) {
                    Ok(v) => self.visit_u64(v),
                    Err(_) => Err(E::custom(format!("schema version {v} is negative"))),
                }
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<SchemaVersion, E> {
                v.parse().map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

/// In the API document: an integer (`1`, meaning `1.0`) or a string `"MAJOR.MINOR"`.
impl utoipa::PartialSchema for SchemaVersion {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use utoipa::openapi::schema::{ObjectBuilder, OneOfBuilder, Type};
        OneOfBuilder::new()
            .item(ObjectBuilder::new().schema_type(Type::Integer).minimum(Some(0)))
            .item(ObjectBuilder::new().schema_type(Type::String).pattern(Some(r"^[0-9]+(\.[0-9]+)?$")))
            .description(Some("Contract version: an integer (1, meaning 1.0) or \"MAJOR.MINOR\"; omitted means 1.0."))
            .into()
    }
}

impl utoipa::ToSchema for SchemaVersion {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn integer_and_string_forms() {
        let v: SchemaVersion = serde_json::from_str("1").unwrap();
        assert_eq!(v, SchemaVersion::CURRENT);
        assert_eq!(serde_json::to_string(&v).unwrap(), "1");
        let v: SchemaVersion = serde_json::from_str("\"1.3\"").unwrap();
        assert_eq!((v, v.readable()), (SchemaVersion::new(1, 3), true));
        assert_eq!(serde_json::to_string(&v).unwrap(), "\"1.3\"");
        let v: SchemaVersion = serde_json::from_str("2").unwrap();
        assert!(!v.readable());
        for bad in ["-1", "\"one\"", "\"1.\"", "\"1.x\"", "1.5", "true", "18446744073709551615"] {
            assert!(serde_json::from_str::<SchemaVersion>(bad).is_err(), "{bad} accepted");
        }
        let m = rmp_serde::to_vec(&SchemaVersion::new(1, 2)).unwrap();
        assert_eq!(rmp_serde::from_slice::<SchemaVersion>(&m).unwrap(), SchemaVersion::new(1, 2));
        let m = rmp_serde::to_vec(&SchemaVersion::CURRENT).unwrap();
        assert_eq!(m, vec![1]);
    }
}
