//! ApiVersions, Metadata, topic admin, configs, coordinators.

use kafka_protocol::messages::create_partitions_request::CreatePartitionsTopic;
use kafka_protocol::messages::create_topics_request::{CreatableTopic, CreatableTopicConfig};
use kafka_protocol::messages::delete_topics_request::DeleteTopicState;
use kafka_protocol::messages::describe_configs_request::DescribeConfigsResource;
use kafka_protocol::messages::incremental_alter_configs_request::{
    AlterConfigsResource, AlterableConfig,
};
use kafka_protocol::messages::metadata_request::MetadataRequestTopic;
use kafka_protocol::messages::*;
use sluice_kafka::SUPPORTED_APIS;
use sluice_vocab::ErrorCode;

use crate::harness::*;

fn table(resp: &ApiVersionsResponse) -> Vec<(i16, i16, i16)> {
    resp.api_keys
        .iter()
        .map(|k| (k.api_key, k.min_version, k.max_version))
        .collect()
}

#[tokio::test]
async fn api_versions_v0_v3_and_unsupported() {
    let server = Server::start().await;
    let mut c = server.client().await;
    for version in [0, 1, 2, 3] {
        let resp = c
            .call(
                &ApiVersionsRequest::default()
                    .with_client_software_name(sb("test"))
                    .with_client_software_version(sb("1")),
                version,
            )
            .await;
        assert_eq!(resp.error_code, 0, "v{version}");
        assert_eq!(table(&resp), SUPPORTED_APIS, "v{version}");
    }
    // v4 is not served: UNSUPPORTED_VERSION with the table, encoded at v0.
    let sent = c.send(&ApiVersionsRequest::default(), 4).await;
    let (got, resp) = c.recv::<ApiVersionsRequest>(0).await;
    assert_eq!(sent, got);
    assert_eq!(resp.error_code, ErrorCode::UnsupportedVersion.code());
    assert_eq!(table(&resp), SUPPORTED_APIS);
    // A version from the future, with a body we cannot know: same answer.
    let body = [0u8, 18, 0, 127, 0, 0, 0, 77, 0xff, 0xff, 0, 1, 2, 3, 4];
    let mut raw = (body.len() as i32).to_be_bytes().to_vec();
    raw.extend_from_slice(&body);
    c.send_raw(&raw).await;
    let (got, resp) = c.recv::<ApiVersionsRequest>(0).await;
    assert_eq!(got, 77);
    assert_eq!(resp.error_code, ErrorCode::UnsupportedVersion.code());
    assert_eq!(table(&resp), SUPPORTED_APIS);
    // The connection stays usable.
    let resp = c.call(&ApiVersionsRequest::default(), 3).await;
    assert_eq!(resp.error_code, 0);
    server.stop().await;
}

#[tokio::test]
async fn unsupported_versions_get_unsupported_version() {
    use kafka_protocol::messages::list_offsets_request::{ListOffsetsPartition, ListOffsetsTopic};
    const E: i16 = ErrorCode::UnsupportedVersion.code();
    let server = Server::start().await;
    server.create_topic("t", 1).await;
    let mut c = server.client().await;

    let resp = c
        .call(&produce_request("t", 0, batch(&["a"], 1), -1), 12)
        .await;
    assert_eq!(resp.responses[0].partition_responses[0].error_code, E);
    let resp = c.call(&fetch_request("t", 0, 0), 17).await;
    assert_eq!(resp.error_code, E);
    let req = ListOffsetsRequest::default().with_topics(vec![ListOffsetsTopic::default()
        .with_name(name("t"))
        .with_partitions(vec![ListOffsetsPartition::default().with_timestamp(-3)])]);
    let resp = c.call(&req, 7).await;
    assert_eq!(resp.topics[0].partitions[0].error_code, E);
    assert_eq!(c.call(&MetadataRequest::default(), 13).await.error_code, E);
    let resp = c
        .call(
            &FindCoordinatorRequest::default().with_coordinator_keys(vec![sb("g")]),
            5,
        )
        .await;
    assert_eq!(resp.coordinators[0].error_code, E);
    assert_eq!(
        c.call(&InitProducerIdRequest::default(), 5)
            .await
            .error_code,
        E
    );
    assert_eq!(
        c.call(&DescribeClusterRequest::default(), 2)
            .await
            .error_code,
        E
    );
    // Nothing was appended by the refused produce.
    assert_eq!(server.store.partition("t", 0).unwrap().log_end_offset(), 0);

    // A version the codec does not know (Produce v99, header v2, no body)
    // cannot be parsed: the connection is closed.
    let body = [0u8, 0, 0, 99, 0, 0, 0, 7, 0xff, 0xff, 0];
    let mut raw = (body.len() as i32).to_be_bytes().to_vec();
    raw.extend_from_slice(&body);
    c.send_raw(&raw).await;
    assert!(c.closed_by_server().await);
    server.stop().await;
}

fn metadata_request(topics: &[&str], auto_create: bool) -> MetadataRequest {
    MetadataRequest::default()
        .with_topics(Some(
            topics
                .iter()
                .map(|t| MetadataRequestTopic::default().with_name(Some(name(t))))
                .collect(),
        ))
        .with_allow_auto_topic_creation(auto_create)
}

#[tokio::test]
async fn metadata_auto_create_and_listing() {
    let server = Server::start_with(|s| s.server.default_partitions = 3).await;
    let mut c = server.client().await;
    let resp = c.call(&metadata_request(&["auto-a"], true), 12).await;
    assert_eq!(resp.brokers.len(), 1);
    assert_eq!(resp.brokers[0].node_id.0, 0);
    assert_eq!(resp.brokers[0].host.as_str(), "127.0.0.1");
    assert_eq!(resp.brokers[0].port, i32::from(server.addr.port()));
    assert_eq!(resp.controller_id.0, 0);
    assert_eq!(
        resp.cluster_id.as_ref().map(|s| s.to_string()),
        Some(server.store.cluster_id())
    );
    let t = &resp.topics[0];
    assert_eq!(t.error_code, 0);
    assert_eq!(t.partitions.len(), 3);
    assert!(!t.topic_id.is_nil());
    for (i, p) in t.partitions.iter().enumerate() {
        assert_eq!(p.partition_index, i as i32);
        assert_eq!(p.leader_id.0, 0);
        assert_eq!(p.replica_nodes, vec![BrokerId(0)]);
        assert_eq!(p.isr_nodes, vec![BrokerId(0)]);
    }
    assert_eq!(server.store.topic("auto-a").unwrap().partitions, 3);

    // Not created when the request says no.
    let resp = c.call(&metadata_request(&["auto-b"], false), 12).await;
    assert_eq!(
        resp.topics[0].error_code,
        ErrorCode::UnknownTopicOrPartition.code()
    );
    assert!(server.store.topic("auto-b").is_none());

    // v1 null topics = all topics; v0 empty list = all topics.
    let all = c
        .call(&MetadataRequest::default().with_topics(None), 1)
        .await;
    assert!(all
        .topics
        .iter()
        .any(|t| t.name.as_ref().map(|n| n.0.as_str()) == Some("auto-a")));
    let all = c
        .call(&MetadataRequest::default().with_topics(Some(vec![])), 0)
        .await;
    assert!(all
        .topics
        .iter()
        .any(|t| t.name.as_ref().map(|n| n.0.as_str()) == Some("auto-a")));
    // v1+ empty list = no topics.
    let none = c
        .call(&MetadataRequest::default().with_topics(Some(vec![])), 9)
        .await;
    assert!(none.topics.is_empty());

    // Lookup by topic id (v12).
    let id = t.topic_id;
    let by_id = c
        .call(
            &MetadataRequest::default().with_topics(Some(vec![MetadataRequestTopic::default()
                .with_name(None)
                .with_topic_id(id)])),
            12,
        )
        .await;
    assert_eq!(
        by_id.topics[0].name.as_ref().map(|n| n.0.to_string()),
        Some("auto-a".to_string())
    );
    server.stop().await;
}

#[tokio::test]
async fn metadata_auto_create_disabled_by_config() {
    let server = Server::start_with(|s| s.server.auto_create_topics = false).await;
    let mut c = server.client().await;
    let resp = c.call(&metadata_request(&["nope"], true), 12).await;
    assert_eq!(
        resp.topics[0].error_code,
        ErrorCode::UnknownTopicOrPartition.code()
    );
    // Produce to an unknown topic is refused as well.
    let (code, _) = produce(&mut c, "nope", 0, batch(&["k"], 1)).await;
    assert_eq!(code, ErrorCode::UnknownTopicOrPartition.code());
    assert!(server.store.topic("nope").is_none());
    server.stop().await;
}

fn creatable(name_: &str, partitions: i32, rf: i16) -> CreatableTopic {
    CreatableTopic::default()
        .with_name(name(name_))
        .with_num_partitions(partitions)
        .with_replication_factor(rf)
}

#[tokio::test]
async fn create_and_delete_topics() {
    let server = Server::start_with(|s| s.server.default_partitions = 2).await;
    let mut c = server.client().await;
    let req = CreateTopicsRequest::default().with_topics(vec![
        creatable("t1", 4, 1).with_configs(vec![CreatableTopicConfig::default()
            .with_name(sb("retention.ms"))
            .with_value(Some(sb("60000")))]),
        creatable("t2", -1, -1),
        creatable("t3", 1, 3),
        creatable("bad/name", 1, 1),
    ]);
    let resp = c.call(&req, 7).await;
    let codes: Vec<i16> = resp.topics.iter().map(|t| t.error_code).collect();
    assert_eq!(
        codes,
        vec![
            0,
            0,
            ErrorCode::InvalidReplicationFactor.code(),
            ErrorCode::InvalidTopicException.code()
        ]
    );
    assert_eq!(resp.topics[0].num_partitions, 4);
    assert_eq!(resp.topics[1].num_partitions, 2);
    assert!(!resp.topics[0].topic_id.is_nil());
    let retention = resp.topics[0]
        .configs
        .as_ref()
        .unwrap()
        .iter()
        .find(|c| c.name.as_str() == "retention.ms")
        .unwrap();
    assert_eq!(retention.value.as_ref().map(|v| v.as_str()), Some("60000"));
    assert_eq!(retention.config_source, 1);
    assert_eq!(server.store.topic("t1").unwrap().partitions, 4);
    assert_eq!(server.store.topic("t2").unwrap().partitions, 2);

    // Existing topic; validate_only creates nothing.
    let resp = c
        .call(
            &CreateTopicsRequest::default().with_topics(vec![creatable("t1", 1, 1)]),
            4,
        )
        .await;
    assert_eq!(
        resp.topics[0].error_code,
        ErrorCode::TopicAlreadyExists.code()
    );
    let resp = c
        .call(
            &CreateTopicsRequest::default()
                .with_topics(vec![creatable("t9", 1, 1)])
                .with_validate_only(true),
            5,
        )
        .await;
    assert_eq!(resp.topics[0].error_code, 0);
    assert!(server.store.topic("t9").is_none());

    // Delete by name (v1..5) and by id (v6).
    let resp = c
        .call(
            &DeleteTopicsRequest::default().with_topic_names(vec![name("t1"), name("missing")]),
            4,
        )
        .await;
    assert_eq!(resp.responses[0].error_code, 0);
    assert_eq!(
        resp.responses[1].error_code,
        ErrorCode::UnknownTopicOrPartition.code()
    );
    assert!(server.store.topic("t1").is_none());
    let id = uuid::Uuid::from_bytes(server.store.topic("t2").unwrap().id);
    let resp = c
        .call(
            &DeleteTopicsRequest::default()
                .with_topics(vec![DeleteTopicState::default().with_topic_id(id)]),
            6,
        )
        .await;
    assert_eq!(resp.responses[0].error_code, 0);
    assert_eq!(
        resp.responses[0].name.as_ref().map(|n| n.0.as_str()),
        Some("t2")
    );
    assert!(server.store.topic("t2").is_none());
    server.stop().await;
}

#[tokio::test]
async fn create_partitions_grows_and_refuses_shrink() {
    let server = Server::start().await;
    server.create_topic("grow", 1).await;
    let mut c = server.client().await;
    let req = |count| {
        CreatePartitionsRequest::default().with_topics(vec![CreatePartitionsTopic::default()
            .with_name(name("grow"))
            .with_count(count)])
    };
    let resp = c.call(&req(3), 3).await;
    assert_eq!(resp.results[0].error_code, 0);
    let md = c.call(&metadata_request(&["grow"], false), 12).await;
    assert_eq!(md.topics[0].partitions.len(), 3);
    // The new partitions take data.
    let (code, offset) = produce(&mut c, "grow", 2, batch(&["x"], 1)).await;
    assert_eq!((code, offset), (0, 0));
    let resp = c.call(&req(2), 0).await;
    assert_eq!(
        resp.results[0].error_code,
        ErrorCode::InvalidPartitions.code()
    );
    assert_eq!(server.store.topic("grow").unwrap().partitions, 3);
    server.stop().await;
}

#[tokio::test]
async fn elections_and_reassignments_on_one_node() {
    use alter_partition_reassignments_request::{ReassignablePartition, ReassignableTopic};
    use elect_leaders_request::TopicPartitions;
    let server = Server::start().await;
    server.create_topic("placed", 1).await;
    let mut c = server.client().await;
    let elect = |topic: &str| {
        ElectLeadersRequest::default().with_topic_partitions(Some(vec![TopicPartitions::default()
            .with_topic(name(topic))
            .with_partitions(vec![0])]))
    };
    let codes = |resp: &ElectLeadersResponse| -> Vec<i16> {
        resp.replica_election_results
            .iter()
            .flat_map(|t| t.partition_result.iter().map(|p| p.error_code))
            .collect()
    };
    for version in [0, 1, 2] {
        let resp = c.call(&elect("placed"), version).await;
        assert_eq!(codes(&resp), [ErrorCode::ElectionNotNeeded.code()]);
    }
    let resp = c.call(&elect("nowhere"), 2).await;
    assert_eq!(codes(&resp), [ErrorCode::UnknownTopicOrPartition.code()]);
    // Every partition: those that need no election are left out.
    let all = ElectLeadersRequest::default().with_topic_partitions(None);
    assert!(codes(&c.call(&all, 2).await).is_empty());
    let unclean = elect("placed").with_election_type(1);
    assert_eq!(
        codes(&c.call(&unclean, 2).await),
        [ErrorCode::ElectionNotNeeded.code()]
    );

    let reassign = |replicas: Option<Vec<i32>>, allow_rf_change: bool| {
        AlterPartitionReassignmentsRequest::default()
            .with_allow_replication_factor_change(allow_rf_change)
            .with_topics(vec![ReassignableTopic::default()
                .with_name(name("placed"))
                .with_partitions(vec![ReassignablePartition::default()
                    .with_replicas(
                        replicas.map(|r| r.into_iter().map(BrokerId).collect()),
                    )])])
    };
    let code =
        |resp: &AlterPartitionReassignmentsResponse| resp.responses[0].partitions[0].error_code;
    let md = c.call(&metadata_request(&["placed"], false), 12).await;
    let me = md.topics[0].partitions[0].replica_nodes[0].0;
    let resp = c.call(&reassign(Some(vec![me]), true), 1).await;
    assert_eq!((resp.error_code, code(&resp)), (0, 0));
    let resp = c.call(&reassign(None, true), 1).await;
    assert_eq!(code(&resp), ErrorCode::NoReassignmentInProgress.code());
    // KIP-860: a change of replica count is refused when the client forbids it.
    let resp = c.call(&reassign(Some(vec![me, me + 1]), false), 1).await;
    assert_eq!(code(&resp), ErrorCode::InvalidReplicationFactor.code());
    let resp = c.call(&reassign(Some(vec![me, me + 1]), true), 1).await;
    assert_eq!(code(&resp), ErrorCode::InvalidReplicaAssignment.code());
    let list = ListPartitionReassignmentsRequest::default();
    let resp = c.call(&list, 0).await;
    assert_eq!(resp.error_code, 0);
    assert!(resp.topics.is_empty());
    server.stop().await;
}

fn describe(topic: &str, keys: Option<Vec<&str>>) -> DescribeConfigsRequest {
    DescribeConfigsRequest::default().with_resources(vec![DescribeConfigsResource::default()
        .with_resource_type(2)
        .with_resource_name(sb(topic))
        .with_configuration_keys(keys.map(|k| k.into_iter().map(sb).collect()))])
}

fn config_value(resp: &DescribeConfigsResponse, key: &str) -> (String, i8) {
    let c = resp.results[0]
        .configs
        .iter()
        .find(|c| c.name.as_str() == key)
        .unwrap_or_else(|| panic!("{key} described"));
    (c.value.as_ref().unwrap().to_string(), c.config_source)
}

fn alter(topic: &str, configs: Vec<(&str, i8, Option<&str>)>) -> IncrementalAlterConfigsRequest {
    IncrementalAlterConfigsRequest::default().with_resources(vec![AlterConfigsResource::default()
        .with_resource_type(2)
        .with_resource_name(sb(topic))
        .with_configs(
            configs
                .into_iter()
                .map(|(k, op, v)| {
                    AlterableConfig::default()
                        .with_name(sb(k))
                        .with_config_operation(op)
                        .with_value(v.map(sb))
                })
                .collect(),
        )])
}

#[tokio::test]
async fn describe_and_alter_configs_round_trip() {
    let server = Server::start().await;
    server.create_topic("cfg", 1).await;
    let mut c = server.client().await;
    let resp = c.call(&describe("cfg", None), 4).await;
    assert_eq!(resp.results[0].error_code, 0);
    let names: Vec<&str> = resp.results[0]
        .configs
        .iter()
        .map(|c| c.name.as_str())
        .collect();
    assert_eq!(names, sluice_log::TopicConfig::KEYS);
    let default_retention = config_value(&resp, "retention.ms");
    assert_eq!(default_retention.1, 5, "DEFAULT_CONFIG");

    let resp = c
        .call(
            &alter(
                "cfg",
                vec![
                    ("retention.ms", 0, Some("1000")),
                    ("max.message.bytes", 0, Some("5000")),
                ],
            ),
            1,
        )
        .await;
    assert_eq!(resp.responses[0].error_code, 0);
    let resp = c
        .call(
            &describe("cfg", Some(vec!["retention.ms", "max.message.bytes"])),
            1,
        )
        .await;
    assert_eq!(resp.results[0].configs.len(), 2);
    assert_eq!(config_value(&resp, "retention.ms"), ("1000".into(), 1));
    assert_eq!(config_value(&resp, "max.message.bytes"), ("5000".into(), 1));
    assert_eq!(
        server.store.topic("cfg").unwrap().config.max_message_bytes,
        5000
    );

    // DELETE goes back to the default; APPEND on a list key.
    let resp = c
        .call(
            &alter(
                "cfg",
                vec![
                    ("retention.ms", 1, None),
                    ("cleanup.policy", 2, Some("compact")),
                ],
            ),
            0,
        )
        .await;
    assert_eq!(resp.responses[0].error_code, 0);
    let resp = c.call(&describe("cfg", None), 3).await;
    assert_eq!(config_value(&resp, "retention.ms"), default_retention);
    let mut policy: Vec<String> = config_value(&resp, "cleanup.policy")
        .0
        .split(',')
        .map(str::to_owned)
        .collect();
    policy.sort();
    assert_eq!(policy, vec!["compact", "delete"]);
    assert_eq!(
        resp.results[0]
            .configs
            .iter()
            .find(|c| c.name.as_str() == "cleanup.policy")
            .unwrap()
            .config_type,
        7
    );

    // Bad value and bad key: INVALID_CONFIG, nothing changed (atomic).
    let resp = c
        .call(
            &alter(
                "cfg",
                vec![
                    ("retention.ms", 0, Some("7")),
                    ("segment.bytes", 0, Some("lots")),
                ],
            ),
            1,
        )
        .await;
    assert_eq!(
        resp.responses[0].error_code,
        ErrorCode::InvalidConfig.code()
    );
    let resp = c
        .call(&describe("cfg", Some(vec!["retention.ms"])), 1)
        .await;
    assert_eq!(config_value(&resp, "retention.ms"), default_retention);
    let resp = c
        .call(&alter("cfg", vec![("retention.ms", 2, Some("5"))]), 1)
        .await;
    assert_eq!(
        resp.responses[0].error_code,
        ErrorCode::InvalidConfig.code()
    );

    // Legacy AlterConfigs replaces the overrides.
    use kafka_protocol::messages::alter_configs_request::{
        AlterConfigsResource as R, AlterableConfig as A,
    };
    let resp = c
        .call(
            &AlterConfigsRequest::default().with_resources(vec![R::default()
                .with_resource_type(2)
                .with_resource_name(sb("cfg"))
                .with_configs(vec![A::default()
                    .with_name(sb("retention.bytes"))
                    .with_value(Some(sb("12345")))])]),
            1,
        )
        .await;
    assert_eq!(resp.responses[0].error_code, 0);
    let info = server.store.topic("cfg").unwrap();
    assert_eq!(
        info.overrides.keys().collect::<Vec<_>>(),
        vec!["retention.bytes"]
    );
    assert_eq!(info.config.retention_bytes, 12345);

    // A topic's override names the broker default under it (synonyms).
    let mut req = describe("cfg", Some(vec!["retention.bytes"]));
    req.include_synonyms = true;
    let resp = c.call(&req, 4).await;
    let synonyms: Vec<(String, i8)> = resp.results[0].configs[0]
        .synonyms
        .iter()
        .map(|s| (s.name.to_string(), s.source))
        .collect();
    assert_eq!(
        synonyms,
        vec![
            ("retention.bytes".to_owned(), 1),
            ("log.retention.bytes".to_owned(), 5)
        ]
    );

    // Broker resource: read-only settings; unknown topic: error.
    let resp = c
        .call(
            &DescribeConfigsRequest::default().with_resources(vec![
                DescribeConfigsResource::default()
                    .with_resource_type(4)
                    .with_resource_name(sb("0")),
            ]),
            4,
        )
        .await;
    assert_eq!(resp.results[0].error_code, 0);
    assert!(resp.results[0].configs.iter().all(|c| c.read_only));
    let typed = |name: &str| {
        resp.results[0]
            .configs
            .iter()
            .find(|c| c.name.as_str() == name)
            .map(|c| (c.value.as_ref().map(|v| v.to_string()), c.config_type))
    };
    assert!(typed("num.partitions").is_some());
    // Every topic config's broker default under Kafka's broker name, typed.
    assert_eq!(
        typed("log.retention.ms"),
        Some((Some("604800000".into()), 5))
    );
    assert_eq!(
        typed("log.cleanup.policy"),
        Some((Some("delete".into()), 7))
    );
    assert_eq!(
        typed("log.cleaner.min.cleanable.ratio").map(|t| t.1),
        Some(6)
    );
    assert_eq!(typed("auto.create.topics.enable").map(|t| t.1), Some(1));
    assert_eq!(
        typed("log.retention.check.interval.ms"),
        None,
        "the binary adds it"
    );
    let resp = c.call(&describe("missing", None), 4).await;
    assert_eq!(
        resp.results[0].error_code,
        ErrorCode::UnknownTopicOrPartition.code()
    );
    server.stop().await;
}

/// AddPartitionsToTxn v4+, the batched form partition leaders use
/// (KIP-890): several transactions in one request, each added or only
/// verified, with a result per transaction.
#[tokio::test]
async fn add_partitions_to_txn_batched_and_verify_only() {
    use add_partitions_to_txn_request::{AddPartitionsToTxnTopic, AddPartitionsToTxnTransaction};
    let server = Server::start().await;
    server.create_topic("vt", 2).await;
    let mut c = server.client().await;
    wait_for_txn_coordinator(&mut c).await;
    let init = c
        .call(
            &InitProducerIdRequest::default()
                .with_transactional_id(Some(TransactionalId(sb("v"))))
                .with_transaction_timeout_ms(60_000),
            4,
        )
        .await;
    assert_eq!(init.error_code, 0);
    let txn = |id: &str, verify_only: bool, partitions: Vec<i32>| {
        AddPartitionsToTxnTransaction::default()
            .with_transactional_id(TransactionalId(sb(id)))
            .with_producer_id(init.producer_id)
            .with_producer_epoch(init.producer_epoch)
            .with_verify_only(verify_only)
            .with_topics(vec![AddPartitionsToTxnTopic::default()
                .with_name(TopicName(sb("vt")))
                .with_partitions(partitions)])
    };
    let codes = |resp: &AddPartitionsToTxnResponse, i: usize| -> Vec<i16> {
        resp.results_by_transaction[i].topic_results[0]
            .results_by_partition
            .iter()
            .map(|p| p.partition_error_code)
            .collect()
    };
    // Added through the batched form; then verified, with an unknown id
    // beside it in the same request.
    let added = c
        .call(
            &AddPartitionsToTxnRequest::default().with_transactions(vec![txn("v", false, vec![0])]),
            4,
        )
        .await;
    assert_eq!((added.error_code, codes(&added, 0)), (0, vec![0]));
    let verified = c
        .call(
            &AddPartitionsToTxnRequest::default().with_transactions(vec![
                txn("v", true, vec![0, 1]),
                txn("nobody", true, vec![0]),
            ]),
            4,
        )
        .await;
    assert_eq!(
        verified.results_by_transaction[1]
            .transactional_id
            .0
            .as_str(),
        "nobody"
    );
    assert_eq!(
        codes(&verified, 0),
        vec![0, ErrorCode::InvalidTxnState.code()]
    );
    assert_eq!(
        codes(&verified, 1),
        vec![ErrorCode::InvalidProducerIdMapping.code()]
    );
    // v5 names a partition outside the transaction TRANSACTION_ABORTABLE.
    let v5 = c
        .call(
            &AddPartitionsToTxnRequest::default().with_transactions(vec![txn("v", true, vec![1])]),
            5,
        )
        .await;
    assert_eq!(codes(&v5, 0), vec![ErrorCode::TransactionAbortable.code()]);
    // Verification added nothing: the coordinator still holds partition 0 only.
    let described = c
        .call(
            &DescribeTransactionsRequest::default()
                .with_transactional_ids(vec![TransactionalId(sb("v"))]),
            0,
        )
        .await;
    assert_eq!(
        described.transaction_states[0].topics[0].partitions,
        vec![0]
    );
    server.stop().await;
}

/// `transaction.max.timeout.ms` is the broker's setting: a producer's
/// timeout up to it is accepted, one above it refused.
#[tokio::test]
async fn the_transaction_timeout_limit_is_configurable() {
    let server = Server::start_with(|s| s.server.transaction_max_timeout_ms = 5_000).await;
    let mut c = server.client().await;
    let init = |timeout_ms| {
        InitProducerIdRequest::default()
            .with_transactional_id(Some(TransactionalId(sb("limited"))))
            .with_transaction_timeout_ms(timeout_ms)
    };
    // Refused before the coordinator has loaded, as Kafka does.
    let over = c.call(&init(5_001), 4).await;
    assert_eq!(over.error_code, ErrorCode::InvalidTransactionTimeout.code());
    wait_for_txn_coordinator(&mut c).await;
    let over = c.call(&init(5_001), 4).await;
    assert_eq!(over.error_code, ErrorCode::InvalidTransactionTimeout.code());
    let at = c.call(&init(5_000), 4).await;
    assert_eq!(at.error_code, 0);
    assert!(at.producer_id.0 >= 0);
    server.stop().await;
}

#[tokio::test]
async fn describe_cluster_find_coordinator_init_producer_id() {
    let server = Server::start().await;
    let mut c = server.client().await;
    let resp = c.call(&DescribeClusterRequest::default(), 1).await;
    assert_eq!(resp.error_code, 0);
    assert_eq!(resp.cluster_id.to_string(), server.store.cluster_id());
    assert_eq!(resp.brokers.len(), 1);
    assert_eq!(resp.brokers[0].port, i32::from(server.addr.port()));

    for version in 0..=3 {
        let resp = c
            .call(
                &FindCoordinatorRequest::default().with_key(sb("g")),
                version,
            )
            .await;
        assert_eq!(resp.error_code, 0, "v{version}");
        assert_eq!(resp.node_id.0, 0);
        assert_eq!(resp.port, i32::from(server.addr.port()));
    }
    // Transactions are coordinated by the leader of __transaction_state-0,
    // which the node creates at start (the client retries until it leads).
    let resp = wait_for_txn_coordinator(&mut c).await;
    assert_eq!(
        (resp.node_id.0, resp.port),
        (0, i32::from(server.addr.port()))
    );
    let resp = c
        .call(
            &FindCoordinatorRequest::default().with_coordinator_keys(vec![sb("g1"), sb("g2")]),
            4,
        )
        .await;
    assert_eq!(resp.coordinators.len(), 2);
    assert!(resp
        .coordinators
        .iter()
        .all(|k| k.error_code == 0 && k.node_id.0 == 0));
    assert_eq!(resp.coordinators[1].key.as_str(), "g2");

    let a = c
        .call(
            &InitProducerIdRequest::default().with_transaction_timeout_ms(60_000),
            4,
        )
        .await;
    let b = c.call(&InitProducerIdRequest::default(), 0).await;
    assert_eq!((a.error_code, b.error_code), (0, 0));
    assert!(a.producer_id.0 >= 0 && b.producer_id.0 >= 0 && a.producer_id != b.producer_id);
    assert_eq!(a.producer_epoch, 0);
    let txn = |timeout_ms| {
        InitProducerIdRequest::default()
            .with_transactional_id(Some(TransactionalId(sb("tx"))))
            .with_transaction_timeout_ms(timeout_ms)
    };
    // No timeout, or one above transaction.max.timeout.ms.
    for bad in [0, 900_001] {
        let t = c.call(&txn(bad), 4).await;
        assert_eq!(t.error_code, ErrorCode::InvalidTransactionTimeout.code());
    }
    // Each InitProducerId of a transactional id bumps its epoch.
    let first = c.call(&txn(60_000), 4).await;
    let second = c.call(&txn(60_000), 4).await;
    assert_eq!((first.error_code, second.error_code), (0, 0));
    assert!(first.producer_id.0 >= 0);
    assert_eq!(
        (second.producer_id, second.producer_epoch),
        (first.producer_id, first.producer_epoch + 1)
    );

    // The coordinator lists and describes it; an open transaction shows
    // its partitions.
    let list = |states: &[&str]| {
        ListTransactionsRequest::default()
            .with_state_filters(states.iter().map(|s| sb(s)).collect())
            .with_duration_filter(-1)
    };
    let listed = c.call(&list(&[]), 1).await;
    assert_eq!(listed.error_code, 0);
    let names: Vec<(String, String)> = listed
        .transaction_states
        .iter()
        .map(|t| {
            (
                t.transactional_id.0.to_string(),
                t.transaction_state.to_string(),
            )
        })
        .collect();
    assert_eq!(names, vec![("tx".to_owned(), "Empty".to_owned())]);
    let filtered = c.call(&list(&["Ongoing", "Bogus"]), 1).await;
    assert!(filtered.transaction_states.is_empty());
    assert_eq!(filtered.unknown_state_filters, vec![sb("Bogus")]);
    // v2: a pattern the whole transactional id must match.
    let by_pattern = |pattern: &str| list(&[]).with_transactional_id_pattern(Some(sb(pattern)));
    let ids = |r: &ListTransactionsResponse| -> Vec<String> {
        r.transaction_states
            .iter()
            .map(|t| t.transactional_id.0.to_string())
            .collect()
    };
    assert_eq!(ids(&c.call(&by_pattern("t."), 2).await), vec!["tx"]);
    assert_eq!(ids(&c.call(&by_pattern(""), 2).await), vec!["tx"]);
    assert!(ids(&c.call(&by_pattern("t"), 2).await).is_empty());
    assert_eq!(
        c.call(&by_pattern("(unclosed"), 2).await.error_code,
        ErrorCode::InvalidRegularExpression.code()
    );

    server.create_topic("txn-topic", 2).await;
    let added = c
        .call(
            &AddPartitionsToTxnRequest::default()
                .with_v3_and_below_transactional_id(TransactionalId(sb("tx")))
                .with_v3_and_below_producer_id(second.producer_id)
                .with_v3_and_below_producer_epoch(second.producer_epoch)
                .with_v3_and_below_topics(vec![
                    add_partitions_to_txn_request::AddPartitionsToTxnTopic::default()
                        .with_name(TopicName(sb("txn-topic")))
                        .with_partitions(vec![1]),
                ]),
            3,
        )
        .await;
    assert_eq!(
        added.results_by_topic_v3_and_below[0].results_by_partition[0].partition_error_code,
        0
    );
    let described = c
        .call(
            &DescribeTransactionsRequest::default().with_transactional_ids(vec![
                TransactionalId(sb("tx")),
                TransactionalId(sb("nope")),
            ]),
            0,
        )
        .await;
    let tx = &described.transaction_states[0];
    assert_eq!(
        (
            tx.error_code,
            tx.transaction_state.as_str(),
            tx.transaction_timeout_ms
        ),
        (0, "Ongoing", 60_000)
    );
    assert_eq!(
        (tx.producer_id, tx.producer_epoch),
        (second.producer_id, second.producer_epoch)
    );
    assert!(tx.transaction_start_time_ms > 0);
    assert_eq!(tx.topics.len(), 1);
    assert_eq!(
        (tx.topics[0].topic.as_str(), tx.topics[0].partitions.clone()),
        ("txn-topic", vec![1])
    );
    assert_eq!(
        described.transaction_states[1].error_code,
        ErrorCode::TransactionalIdNotFound.code()
    );
    assert_eq!(
        c.call(&list(&["Ongoing"]), 0)
            .await
            .transaction_states
            .len(),
        1
    );
    server.stop().await;
}

#[tokio::test]
async fn describe_producers_shows_the_leaders_producer_state() {
    use kafka_protocol::messages::add_partitions_to_txn_request::AddPartitionsToTxnTopic;
    use kafka_protocol::messages::describe_producers_request::TopicRequest;

    let server = Server::start().await;
    let mut c = server.client().await;
    server.create_topic("dp", 2).await;
    let describe = |topics: &[(&str, &[i32])]| {
        DescribeProducersRequest::default().with_topics(
            topics
                .iter()
                .map(|(t, ps)| {
                    TopicRequest::default()
                        .with_name(name(t))
                        .with_partition_indexes(ps.to_vec())
                })
                .collect(),
        )
    };

    let idempotent = c.call(&InitProducerIdRequest::default(), 4).await;
    let pid = idempotent.producer_id.0;
    let (code, _) = produce(
        &mut c,
        "dp",
        0,
        idempotent_batch(&["a", "b", "c"], pid, 0, 0),
    )
    .await;
    assert_eq!(code, 0);

    wait_for_txn_coordinator(&mut c).await;
    let init = c
        .call(
            &InitProducerIdRequest::default()
                .with_transactional_id(Some(TransactionalId(sb("dp-tx"))))
                .with_transaction_timeout_ms(60_000),
            4,
        )
        .await;
    assert_eq!(init.error_code, 0);
    let (tpid, tepoch) = (init.producer_id.0, init.producer_epoch);
    let added = c
        .call(
            &AddPartitionsToTxnRequest::default()
                .with_v3_and_below_transactional_id(TransactionalId(sb("dp-tx")))
                .with_v3_and_below_producer_id(ProducerId(tpid))
                .with_v3_and_below_producer_epoch(tepoch)
                .with_v3_and_below_topics(vec![AddPartitionsToTxnTopic::default()
                    .with_name(name("dp"))
                    .with_partitions(vec![0])]),
            3,
        )
        .await;
    assert_eq!(
        added.results_by_topic_v3_and_below[0].results_by_partition[0].partition_error_code,
        0
    );
    let mut req = produce_request(
        "dp",
        0,
        transactional_batch(&["t1", "t2"], tpid, tepoch, 0),
        -1,
    );
    req.transactional_id = Some(TransactionalId(sb("dp-tx")));
    let produced = c.call(&req, 9).await;
    let p = &produced.responses[0].partition_responses[0];
    assert_eq!((p.error_code, p.base_offset), (0, 3));

    let resp = c
        .call(&describe(&[("dp", &[0, 1, 7]), ("no-such-topic", &[0])]), 0)
        .await;
    let dp = &resp.topics[0];
    assert_eq!(dp.name.0.as_str(), "dp");
    let p0 = &dp.partitions[0];
    assert_eq!((p0.partition_index, p0.error_code), (0, 0));
    let mut states: Vec<_> = p0
        .active_producers
        .iter()
        .map(|s| {
            (
                s.producer_id.0,
                s.producer_epoch,
                s.last_sequence,
                s.current_txn_start_offset,
                s.coordinator_epoch,
            )
        })
        .collect();
    states.sort_unstable();
    assert_eq!(
        states,
        vec![(pid, 0, 2, -1, -1), (tpid, i32::from(tepoch), 1, 3, -1)]
    );
    assert!(p0
        .active_producers
        .iter()
        .all(|s| s.last_timestamp == 1_000));
    assert_eq!(
        (
            dp.partitions[1].error_code,
            dp.partitions[1].active_producers.len()
        ),
        (0, 0)
    );
    assert_eq!(
        dp.partitions[2].error_code,
        ErrorCode::UnknownTopicOrPartition.code()
    );
    assert_eq!(
        (
            resp.topics[1].partitions[0].partition_index,
            resp.topics[1].partitions[0].error_code
        ),
        (0, ErrorCode::UnknownTopicOrPartition.code())
    );

    // Once the commit marker is written, the transaction is no longer open
    // and the producer carries the coordinator's epoch.
    let ended = c
        .call(
            &EndTxnRequest::default()
                .with_transactional_id(TransactionalId(sb("dp-tx")))
                .with_producer_id(ProducerId(tpid))
                .with_producer_epoch(tepoch)
                .with_committed(true),
            3,
        )
        .await;
    assert_eq!(ended.error_code, 0);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let resp = c.call(&describe(&[("dp", &[0])]), 0).await;
        let state = resp.topics[0].partitions[0]
            .active_producers
            .iter()
            .find(|s| s.producer_id.0 == tpid)
            .cloned()
            .unwrap();
        if state.current_txn_start_offset == -1 {
            assert!(state.coordinator_epoch >= 0);
            assert_eq!(state.producer_epoch, i32::from(tepoch));
            assert!(state.last_timestamp > 1_000, "the marker's time");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "no commit marker");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    server.stop().await;
}

#[tokio::test]
async fn connection_limit_closes_extra_connections() {
    let server = Server::start_with(|s| s.server.max_connections = 1).await;
    let mut first = server.client().await;
    assert_eq!(
        first
            .call(&ApiVersionsRequest::default(), 0)
            .await
            .error_code,
        0
    );
    let mut second = server.client().await;
    assert!(second.closed_by_server().await);
    assert_eq!(
        first
            .call(&ApiVersionsRequest::default(), 0)
            .await
            .error_code,
        0
    );
    drop(first);
    // The slot frees up once the first connection is gone.
    let mut third = None;
    for _ in 0..50 {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        let mut c = server.client().await;
        let sent = c.send(&ApiVersionsRequest::default(), 0).await;
        let mut buf = [0u8; 4];
        use tokio::io::AsyncReadExt;
        if let Ok(Ok(1..)) =
            tokio::time::timeout(std::time::Duration::from_secs(1), c.stream.read(&mut buf)).await
        {
            let _ = sent;
            third = Some(());
            break;
        }
    }
    assert!(
        third.is_some(),
        "a new connection is served after the first closed"
    );
    server.stop().await;
}

/// Produce v0-v2 are advertised (old librdkafka only compresses when the
/// Produce range starts at v0, librdkafka #4956) but refused per partition
/// with UNSUPPORTED_VERSION in each version's own response layout, as
/// Kafka 4 does (KAFKA-18659); nothing is appended. v3+ are served.
#[tokio::test]
async fn produce_v0_v2_advertised_but_refused() {
    use kafka_protocol::messages::produce_request::{PartitionProduceData, TopicProduceData};
    use kafka_protocol::protocol::Decodable;
    const E: i16 = ErrorCode::UnsupportedVersion.code();
    let server = Server::start().await;
    server.create_topic("t", 2).await;
    let mut c = server.client().await;

    let resp = c.call(&ApiVersionsRequest::default(), 3).await;
    let produce = table(&resp)
        .into_iter()
        .find(|e| e.0 == ApiKey::Produce as i16);
    assert_eq!(produce, Some((ApiKey::Produce as i16, 0, 11)));

    assert_eq!(produce_at(&mut c, 3, "a").await, (0, 0));
    let data = |p: i32, key: &str| {
        PartitionProduceData::default()
            .with_index(p)
            .with_records(Some(batch(&[key], 1)))
    };
    let req = ProduceRequest::default()
        .with_acks(-1)
        .with_timeout_ms(5_000)
        .with_topic_data(vec![
            TopicProduceData::default()
                .with_name(name("t"))
                .with_partition_data(vec![data(0, "x"), data(1, "y")]),
            TopicProduceData::default()
                .with_name(name("unknown"))
                .with_partition_data(vec![data(0, "z")]),
        ]);
    for version in 0..=2i16 {
        let sent = c.send(&req, version).await;
        // Response header v0 for every Produce version below 9.
        let (got, body) = c.recv_frame(0).await;
        assert_eq!(sent, got, "v{version}");
        // The layout, counted by hand from Kafka's ProduceResponse schema:
        // [topic: name, [partition: index i32, error i16, base offset i64,
        // log append time i64 (v2+)]], throttle time i32 (v1+).
        let partition = 4 + 2 + 8 + if version >= 2 { 8 } else { 0 };
        let topic = |name_len: usize, partitions: usize| 2 + name_len + 4 + partitions * partition;
        let expected = 4 + topic(1, 2) + topic(7, 1) + if version >= 1 { 4 } else { 0 };
        assert_eq!(body.len(), expected, "v{version} response size");
        let mut buf = body.clone();
        let resp = ProduceResponse::decode(&mut buf, version).unwrap();
        assert!(buf.is_empty(), "v{version} trailing bytes");
        assert_eq!(resp.throttle_time_ms, 0);
        let got: Vec<(String, i32, i16, i64, i64)> = resp
            .responses
            .iter()
            .flat_map(|t| {
                t.partition_responses.iter().map(|p| {
                    (
                        t.name.to_string(),
                        p.index,
                        p.error_code,
                        p.base_offset,
                        p.log_append_time_ms,
                    )
                })
            })
            .collect();
        assert_eq!(
            got,
            vec![
                ("t".into(), 0, E, -1, -1),
                ("t".into(), 1, E, -1, -1),
                ("unknown".into(), 0, E, -1, -1),
            ],
            "v{version}"
        );
    }
    // Nothing appended, no topic auto-created; the connection is still served.
    assert_eq!(server.store.partition("t", 0).unwrap().log_end_offset(), 1);
    assert_eq!(server.store.partition("t", 1).unwrap().log_end_offset(), 0);
    assert!(server.store.partition("unknown", 0).is_none());
    for version in 4..=11i16 {
        assert_eq!(
            produce_at(&mut c, version, "b").await,
            (0, i64::from(version) - 3),
            "v{version}"
        );
    }
    for partition in [0, 1] {
        let resp = c.call(&fetch_request("t", partition, 0), 4).await;
        let p = &resp.responses[0].partitions[0];
        assert_eq!(p.error_code, 0);
        let keys: Vec<String> = decode(p.records.clone().unwrap_or_default())
            .into_iter()
            .map(|(_, key, _)| key)
            .collect();
        let want: Vec<String> = match partition {
            0 => std::iter::once("a".to_string())
                .chain((4..=11).map(|_| "b".to_string()))
                .collect(),
            _ => Vec::new(),
        };
        assert_eq!(keys, want, "partition {partition}");
    }
    server.stop().await;
}

/// Produces one record to partition 0 of "t" at `version`: (error, base offset).
async fn produce_at(c: &mut Raw, version: i16, key: &str) -> (i16, i64) {
    let resp = c
        .call(&produce_request("t", 0, batch(&[key], 1), -1), version)
        .await;
    let p = &resp.responses[0].partition_responses[0];
    (p.error_code, p.base_offset)
}
