//! The broker's ApiVersions table and the choice of a version per API.

use kafka_protocol::messages::{ApiKey, ApiVersionsResponse};

use crate::ClientError;

/// An inclusive range of versions of one API.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VersionRange {
    /// The oldest version.
    pub min: i16,
    /// The newest version.
    pub max: i16,
}

impl std::fmt::Display for VersionRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "v{}-v{}", self.min, self.max)
    }
}

/// The versions a broker serves, per API key, as its ApiVersions answer
/// listed them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Versions {
    ranges: Vec<(i16, VersionRange)>,
}

impl Versions {
    /// A table of `(api key, range)` entries.
    pub fn new(ranges: impl IntoIterator<Item = (i16, VersionRange)>) -> Versions {
        Versions {
            ranges: ranges.into_iter().collect(),
        }
    }

    /// The table an ApiVersions answer carries.
    pub fn from_response(resp: &ApiVersionsResponse) -> Versions {
        Versions::new(resp.api_keys.iter().map(|k| {
            (
                k.api_key,
                VersionRange {
                    min: k.min_version,
                    max: k.max_version,
                },
            )
        }))
    }

    /// The range the broker serves for `api`, if it serves it.
    pub fn get(&self, api: ApiKey) -> Option<VersionRange> {
        let key = api as i16;
        self.ranges.iter().find(|(k, _)| *k == key).map(|(_, r)| *r)
    }

    /// The highest version of `api` both sides speak: at most `ours_max`
    /// and the broker's max, at least `ours_min` and the broker's min.
    pub fn pick(&self, api: ApiKey, ours_min: i16, ours_max: i16) -> Result<i16, ClientError> {
        let broker = self.get(api);
        let ours = VersionRange {
            min: ours_min,
            max: ours_max,
        };
        if let Some(r) = broker {
            let v = r.max.min(ours_max);
            if v >= r.min.max(ours_min) {
                return Ok(v);
            }
        }
        Err(ClientError::Unsupported { api, broker, ours })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kafka_protocol::messages::api_versions_response::ApiVersion;

    fn table(entries: &[(ApiKey, i16, i16)]) -> Versions {
        Versions::new(
            entries
                .iter()
                .map(|&(k, min, max)| (k as i16, VersionRange { min, max })),
        )
    }

    fn unsupported(r: Result<i16, ClientError>) -> Option<VersionRange> {
        match r {
            Err(ClientError::Unsupported { broker, .. }) => broker,
            other => panic!("expected Unsupported, got {other:?}"),
        }
    }

    #[test]
    fn picks_the_highest_common_version() {
        let v = table(&[(ApiKey::Produce, 3, 11), (ApiKey::Fetch, 4, 16)]);
        assert_eq!(v.pick(ApiKey::Produce, 3, 9).unwrap(), 9);
        assert_eq!(v.pick(ApiKey::Produce, 3, 20).unwrap(), 11);
        assert_eq!(v.pick(ApiKey::Produce, 0, 2).ok(), None);
        assert_eq!(v.pick(ApiKey::Fetch, 4, 12).unwrap(), 12);
        // Ranges that touch in one version.
        assert_eq!(v.pick(ApiKey::Fetch, 16, 20).unwrap(), 16);
        assert_eq!(v.pick(ApiKey::Fetch, 0, 4).unwrap(), 4);
        assert_eq!(v.pick(ApiKey::Fetch, 12, 12).unwrap(), 12);
    }

    #[test]
    fn ranges_that_do_not_meet_are_unsupported() {
        let v = table(&[(ApiKey::Produce, 3, 11), (ApiKey::Fetch, 4, 16)]);
        let fetch = Some(VersionRange { min: 4, max: 16 });
        // The broker is too old, or too new.
        assert_eq!(unsupported(v.pick(ApiKey::Fetch, 17, 18)), fetch);
        assert_eq!(unsupported(v.pick(ApiKey::Fetch, 0, 3)), fetch);
        // An API the broker does not list.
        assert_eq!(unsupported(v.pick(ApiKey::Metadata, 0, 12)), None);
        // A backwards range of ours never meets anything.
        assert!(v.pick(ApiKey::Produce, 9, 5).is_err());
        // Nor does a broker's backwards range.
        let odd = table(&[(ApiKey::Produce, 9, 5)]);
        assert!(odd.pick(ApiKey::Produce, 0, 20).is_err());
        assert!(Versions::default().pick(ApiKey::Produce, 0, 20).is_err());
    }

    #[test]
    fn unsupported_names_both_ranges() {
        let v = table(&[(ApiKey::Produce, 0, 2)]);
        let msg = v.pick(ApiKey::Produce, 3, 11).unwrap_err().to_string();
        assert!(msg.contains("Produce"), "{msg}");
        assert!(msg.contains("v0-v2") && msg.contains("v3-v11"), "{msg}");
        let msg = v.pick(ApiKey::Fetch, 4, 12).unwrap_err().to_string();
        assert!(msg.contains("does not serve"), "{msg}");
    }

    #[test]
    fn reads_an_api_versions_answer() {
        let resp = ApiVersionsResponse::default().with_api_keys(vec![ApiVersion::default()
            .with_api_key(ApiKey::Fetch as i16)
            .with_min_version(4)
            .with_max_version(12)]);
        let v = Versions::from_response(&resp);
        assert_eq!(v.get(ApiKey::Fetch), Some(VersionRange { min: 4, max: 12 }));
        assert_eq!(v.get(ApiKey::Produce), None);
    }
}
