//! DescribeClientQuotas and AlterClientQuotas over the quotas in the metadata
//! image (`sluice_cluster::quotas`, which owns the rules); `crate::quotas`
//! enforces them.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use kafka_protocol::messages::alter_client_quotas_response;
use kafka_protocol::messages::describe_client_quotas_response::{EntityData, EntryData, ValueData};
use kafka_protocol::messages::*;
use sluice_topology::quotas::{validate, QuotaAlteration, QuotaValue, CLIENT_ID, USER};
use sluice_topology::{wait_image, Command};
use sluice_vocab::{ErrorCode, Refused};

use super::str_bytes;
use crate::dispatch::{later, Hdr, Outcome};
use crate::server::Ctx;

/// DescribeClientQuotas' match types.
const MATCH_EXACT: i8 = 0;
const MATCH_DEFAULT: i8 = 1;
const MATCH_ANY: i8 = 2;

/// How long an answer waits for the local image to show a committed change.
const IMAGE_WAIT: Duration = Duration::from_secs(10);

/// The request's filter, checked: (entity type, the name wanted: `None` any,
/// `Some(None)` the default entity, `Some(Some(n))` the entity `n`).
type Filter = Vec<(String, Option<Option<String>>)>;

fn filter_of(req: &DescribeClientQuotasRequest) -> Result<Filter, String> {
    let mut seen = BTreeSet::new();
    req.components
        .iter()
        .map(|c| {
            let kind = c.entity_type.to_string();
            if kind != USER && kind != CLIENT_ID && kind != "ip" {
                return Err(format!("unknown entity type {kind}"));
            }
            if !seen.insert(kind.clone()) {
                return Err(format!("entity type {kind} is filtered twice"));
            }
            let wanted = match (c.match_type, &c._match) {
                (MATCH_EXACT, Some(name)) => Some(Some(name.to_string())),
                (MATCH_EXACT, None) => {
                    return Err(format!("an exact match of {kind} needs a name"))
                }
                (MATCH_DEFAULT, _) => Some(None),
                (MATCH_ANY, _) => None,
                (other, _) => return Err(format!("unknown match type {other}")),
            };
            Ok((kind, wanted))
        })
        .collect()
}

pub(crate) fn describe_client_quotas(
    ctx: &Ctx,
    req: DescribeClientQuotasRequest,
) -> DescribeClientQuotasResponse {
    let filter = match filter_of(&req) {
        Ok(f) => f,
        Err(message) => {
            return DescribeClientQuotasResponse::default()
                .with_error_code(ErrorCode::InvalidRequest.code())
                .with_error_message(Some(str_bytes(&message)))
                .with_entries(None)
        }
    };
    let image = ctx.topology.image();
    let entries = image
        .quotas
        .entries
        .iter()
        .filter(|q| {
            (!req.strict || q.entity.len() == filter.len())
                && filter.iter().all(|(kind, wanted)| {
                    q.entity
                        .iter()
                        .any(|(k, name)| k == kind && wanted.as_ref().is_none_or(|w| w == name))
                })
        })
        .map(|q| {
            EntryData::default()
                .with_entity(
                    q.entity
                        .iter()
                        .map(|(kind, name)| {
                            EntityData::default()
                                .with_entity_type(str_bytes(kind))
                                .with_entity_name(name.as_deref().map(str_bytes))
                        })
                        .collect(),
                )
                .with_values(
                    q.values
                        .iter()
                        .map(|(key, value)| {
                            ValueData::default()
                                .with_key(str_bytes(key))
                                .with_value(value.0)
                        })
                        .collect(),
                )
        })
        .collect();
    DescribeClientQuotasResponse::default().with_entries(Some(entries))
}

/// One entry of an AlterClientQuotas request, checked.
fn alteration(entry: &alter_client_quotas_request::EntryData) -> Result<QuotaAlteration, Refused> {
    let entity: Vec<(String, Option<String>)> = entry
        .entity
        .iter()
        .map(|e| {
            (
                e.entity_type.to_string(),
                e.entity_name.as_ref().map(|n| n.to_string()),
            )
        })
        .collect();
    let mut changes = BTreeMap::new();
    for op in &entry.ops {
        let value = (!op.remove).then_some(QuotaValue(op.value));
        if changes.insert(op.key.to_string(), value).is_some() {
            return Err(Refused::new(
                ErrorCode::InvalidRequest,
                format!("quota {} is altered twice", op.key.as_str()),
            ));
        }
    }
    let entity = validate(&entity, &changes).map_err(|e| Refused::from_error(&e))?;
    Ok(QuotaAlteration { entity, changes })
}

pub(crate) fn alter_client_quotas(
    ctx: &Arc<Ctx>,
    req: AlterClientQuotasRequest,
    h: Hdr,
) -> Outcome {
    let ctx = ctx.clone();
    later(h, async move {
        let mut results: Vec<Result<QuotaAlteration, Refused>> =
            req.entries.iter().map(alteration).collect();
        let valid: Vec<QuotaAlteration> = results
            .iter()
            .filter_map(|r| r.as_ref().ok().cloned())
            .collect();
        if !req.validate_only && !valid.is_empty() {
            match ctx
                .topology
                .propose(Command::AlterClientQuotas(valid.clone()))
                .await
            {
                Ok(_) => {
                    tracing::info!(entities = valid.len(), "client quotas altered");
                    wait_image(ctx.topology.as_ref(), IMAGE_WAIT, |image| {
                        valid.iter().all(|a| {
                            let entity: Vec<(&str, Option<&str>)> = a
                                .entity
                                .iter()
                                .map(|(k, n)| (k.as_str(), n.as_deref()))
                                .collect();
                            let now = image.quotas.of(&entity);
                            a.changes
                                .iter()
                                .all(|(key, value)| now.and_then(|v| v.get(key)) == value.as_ref())
                        })
                    })
                    .await;
                }
                Err(failure) => {
                    for r in results.iter_mut().filter(|r| r.is_ok()) {
                        *r = Err(failure.clone());
                    }
                }
            }
        }
        let entries = req
            .entries
            .iter()
            .zip(results)
            .map(|(entry, result)| {
                let out = alter_client_quotas_response::EntryData::default().with_entity(
                    entry
                        .entity
                        .iter()
                        .map(|e| {
                            alter_client_quotas_response::EntityData::default()
                                .with_entity_type(e.entity_type.clone())
                                .with_entity_name(e.entity_name.clone())
                        })
                        .collect(),
                );
                match result {
                    Ok(_) => out,
                    Err(e) => out
                        .with_error_code(e.code.code())
                        .with_error_message(Some(str_bytes(&e.message))),
                }
            })
            .collect();
        AlterClientQuotasResponse::default().with_entries(entries)
    })
}
