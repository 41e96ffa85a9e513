//! Client quotas, as Kafka keeps them: byte rates per user, per client id, or
//! per user and client id, with default entities at each level. Kept in the
//! quorum so every node enforces the same quotas (each node measures only
//! what it serves, as each Kafka broker does).
//!
//! Only the quotas Sluice enforces are accepted: `producer_byte_rate` and
//! `consumer_byte_rate` on user and client-id entities. Kafka's
//! `request_percentage`, `controller_mutation_rate` and IP entities
//! (`connection_creation_rate`) are refused, so a tool never believes a
//! quota holds that does not.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::image::{CommandError, CommandOutput, CommandResult, MetadataImage};

/// Kafka's entity types.
pub const USER: &str = "user";
pub const CLIENT_ID: &str = "client-id";

/// The quota keys Sluice enforces.
pub const PRODUCER_BYTE_RATE: &str = "producer_byte_rate";
pub const CONSUMER_BYTE_RATE: &str = "consumer_byte_rate";

/// An entity: (type, name) pairs sorted by type, at most one per type; a
/// `None` name is that type's default entity.
pub type QuotaEntity = Vec<(String, Option<String>)>;

/// A quota value (bytes per second). Compared bit for bit, so the image
/// stays `Eq`.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct QuotaValue(pub f64);

impl PartialEq for QuotaValue {
    fn eq(&self, other: &Self) -> bool {
        self.0.to_bits() == other.0.to_bits()
    }
}

impl Eq for QuotaValue {}

/// The quotas of one entity.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientQuota {
    pub entity: QuotaEntity,
    pub values: BTreeMap<String, QuotaValue>,
}

/// Every entity with a quota, sorted by entity.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuotaModel {
    #[serde(default)]
    pub entries: Vec<ClientQuota>,
}

/// One entity's changes: a key set to a value, or removed (`None`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuotaAlteration {
    pub entity: QuotaEntity,
    pub changes: BTreeMap<String, Option<QuotaValue>>,
}

/// Why an alteration is refused, or the entity in its canonical form
/// (sorted by type).
pub fn validate(
    entity: &[(String, Option<String>)],
    changes: &BTreeMap<String, Option<QuotaValue>>,
) -> Result<QuotaEntity, CommandError> {
    let invalid = |m: String| Err(CommandError::InvalidRequest(m));
    if entity.is_empty() {
        return invalid("a quota entity names at least one entity type".into());
    }
    let mut sorted: QuotaEntity = entity.to_vec();
    sorted.sort();
    for pair in sorted.windows(2) {
        if pair[0].0 == pair[1].0 {
            return invalid(format!("entity type {} appears twice", pair[0].0));
        }
    }
    for (kind, name) in &sorted {
        match kind.as_str() {
            USER | CLIENT_ID => {}
            "ip" => {
                return invalid(
                    "IP quotas (connection_creation_rate) are not enforced by Sluice".into(),
                )
            }
            other => return invalid(format!("unknown entity type {other}")),
        }
        if name.as_deref() == Some("") {
            return invalid(format!("an empty {kind} name; use the default entity"));
        }
    }
    for (key, value) in changes {
        match key.as_str() {
            PRODUCER_BYTE_RATE | CONSUMER_BYTE_RATE => {}
            "request_percentage" | "controller_mutation_rate" => {
                return invalid(format!("{key} is not enforced by Sluice"))
            }
            other => return invalid(format!("unknown quota {other}")),
        }
        if let Some(QuotaValue(v)) = value {
            // Kafka's byte rates are longs.
            if !(v.is_finite() && *v >= 1.0 && v.fract() == 0.0 && *v <= i64::MAX as f64) {
                return invalid(format!(
                    "{key} must be a whole number of bytes per second, at least 1; got {v}"
                ));
            }
        }
    }
    Ok(sorted)
}

impl QuotaModel {
    /// The quotas of exactly `entity` (sorted by type).
    pub fn of(&self, entity: &[(&str, Option<&str>)]) -> Option<&BTreeMap<String, QuotaValue>> {
        self.entries
            .iter()
            .find(|q| {
                q.entity.len() == entity.len()
                    && q.entity
                        .iter()
                        .zip(entity)
                        .all(|((k, n), (k2, n2))| k == k2 && n.as_deref() == *n2)
            })
            .map(|q| &q.values)
    }
}

impl MetadataImage {
    pub(crate) fn alter_client_quotas(&mut self, alterations: &[QuotaAlteration]) -> CommandResult {
        // All or nothing: every alteration is checked before any applies.
        let checked = alterations
            .iter()
            .map(|a| validate(&a.entity, &a.changes).map(|entity| (entity, &a.changes)))
            .collect::<Result<Vec<_>, _>>()?;
        for (entity, changes) in checked {
            let at = self
                .quotas
                .entries
                .binary_search_by(|q| q.entity.cmp(&entity));
            let index = match at {
                Ok(i) => i,
                Err(i) => {
                    self.quotas.entries.insert(
                        i,
                        ClientQuota {
                            entity,
                            values: BTreeMap::new(),
                        },
                    );
                    i
                }
            };
            let values = &mut self.quotas.entries[index].values;
            for (key, value) in changes {
                match value {
                    Some(v) => values.insert(key.clone(), *v),
                    None => values.remove(key),
                };
            }
            if values.is_empty() {
                self.quotas.entries.remove(index);
            }
        }
        Ok(CommandOutput::Done)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entity(pairs: &[(&str, Option<&str>)]) -> QuotaEntity {
        pairs
            .iter()
            .map(|(k, n)| (k.to_string(), n.map(str::to_owned)))
            .collect()
    }

    fn set(key: &str, v: Option<f64>) -> BTreeMap<String, Option<QuotaValue>> {
        [(key.to_string(), v.map(QuotaValue))].into()
    }

    #[test]
    fn alterations_set_replace_and_remove_and_refuse_what_is_not_enforced() {
        let mut img = MetadataImage::default();
        let alter = |img: &mut MetadataImage, e, changes| {
            img.alter_client_quotas(&[QuotaAlteration { entity: e, changes }])
        };
        // Given in any order, kept sorted by type.
        let both = entity(&[(USER, Some("u")), (CLIENT_ID, None)]);
        assert!(alter(&mut img, both, set(PRODUCER_BYTE_RATE, Some(1024.0))).is_ok());
        let key = [(CLIENT_ID, None), (USER, Some("u"))];
        assert_eq!(
            img.quotas.of(&key).map(|v| v[PRODUCER_BYTE_RATE]),
            Some(QuotaValue(1024.0))
        );
        let sorted = entity(&key);
        assert!(alter(
            &mut img,
            sorted.clone(),
            set(CONSUMER_BYTE_RATE, Some(10.0))
        )
        .is_ok());
        assert_eq!(img.quotas.of(&key).map(|v| v.len()), Some(2));
        for key_ in [PRODUCER_BYTE_RATE, CONSUMER_BYTE_RATE] {
            assert!(alter(&mut img, sorted.clone(), set(key_, None)).is_ok());
        }
        assert!(img.quotas.entries.is_empty(), "no values, no entity");
        for (e, changes) in [
            (
                entity(&[("ip", None)]),
                set("connection_creation_rate", Some(1.0)),
            ),
            (
                entity(&[(USER, None)]),
                set("request_percentage", Some(50.0)),
            ),
            (entity(&[(USER, None)]), set(PRODUCER_BYTE_RATE, Some(0.5))),
            (
                entity(&[(USER, None)]),
                set(PRODUCER_BYTE_RATE, Some(f64::NAN)),
            ),
            (
                entity(&[(USER, None), (USER, Some("x"))]),
                set(PRODUCER_BYTE_RATE, Some(1.0)),
            ),
            (entity(&[]), set(PRODUCER_BYTE_RATE, Some(1.0))),
            (
                entity(&[("group", None)]),
                set(PRODUCER_BYTE_RATE, Some(1.0)),
            ),
            (
                entity(&[(CLIENT_ID, Some(""))]),
                set(PRODUCER_BYTE_RATE, Some(1.0)),
            ),
        ] {
            let r = alter(&mut img, e.clone(), changes.clone());
            assert!(
                matches!(r, Err(CommandError::InvalidRequest(_))),
                "{e:?} {changes:?}: {r:?}"
            );
        }
        // One bad alteration refuses the whole command.
        let r = img.alter_client_quotas(&[
            QuotaAlteration {
                entity: entity(&[(CLIENT_ID, Some("a"))]),
                changes: set(PRODUCER_BYTE_RATE, Some(1.0)),
            },
            QuotaAlteration {
                entity: entity(&[(CLIENT_ID, Some("b"))]),
                changes: set("nope", Some(1.0)),
            },
        ]);
        assert!(r.is_err());
        assert!(img.quotas.entries.is_empty());
    }
}
