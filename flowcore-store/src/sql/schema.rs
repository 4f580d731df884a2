//! The tables, shared by both backends (the DDL differs only in the `runs.seq` and binary types).

diesel::table! {
    flows (id) {
        id -> Text,
        latest_version -> Integer,
        created_at -> BigInt,
        updated_at -> BigInt,
    }
}

diesel::table! {
    flow_versions (flow_id, version) {
        flow_id -> Text,
        version -> Integer,
        definition -> Text,
        created_at -> BigInt,
    }
}

diesel::table! {
    runs (seq) {
        seq -> BigInt,
        id -> Text,
        flow_id -> Text,
        flow_version -> Integer,
        status -> Text,
        input -> Text,
        output -> Nullable<Text>,
        error -> Nullable<Text>,
        idempotency_key -> Nullable<Text>,
        created_at -> BigInt,
        started_at -> Nullable<BigInt>,
        finished_at -> Nullable<BigInt>,
        lease_owner -> Nullable<Text>,
        lease_expires_at -> Nullable<BigInt>,
        epoch -> BigInt,
        trigger -> Nullable<Text>,
        data_pruned_at -> Nullable<BigInt>,
        parked -> Nullable<Text>,
        wake_at -> Nullable<BigInt>,
        rerun_of -> Nullable<Text>,
        concurrency_key -> Nullable<Text>,
        concurrency_limit -> Nullable<Integer>,
        priority -> SmallInt,
    }
}

diesel::table! {
    signals (id) {
        id -> BigInt,
        run_id -> Text,
        name -> Text,
        payload -> Text,
        created_at -> BigInt,
        taken_by -> Nullable<Text>,
    }
}

diesel::table! {
    wait_keys (signal, key, run_id) {
        signal -> Text,
        key -> Text,
        run_id -> Text,
    }
}

diesel::table! {
    steps (run_id, node) {
        run_id -> Text,
        node -> Text,
        status -> Text,
        attempts -> Integer,
        started_at -> Nullable<BigInt>,
        finished_at -> Nullable<BigInt>,
        output -> Nullable<Text>,
        error -> Nullable<Text>,
        port -> Nullable<Text>,
        error_code -> Nullable<Text>,
        items_total -> Nullable<Integer>,
        items_done -> Nullable<Integer>,
        reused -> Bool,
    }
}

diesel::table! {
    map_items (run_id, node, first_index) {
        run_id -> Text,
        node -> Text,
        first_index -> Integer,
        items -> Text,
    }
}

diesel::table! {
    credentials (id) {
        id -> Text,
        name -> Text,
        kind -> Text,
        key_id -> Text,
        ciphertext -> Binary,
        created_at -> BigInt,
        updated_at -> BigInt,
        allowed_hosts -> Nullable<Text>,
    }
}

diesel::table! {
    api_keys (id) {
        id -> Text,
        name -> Text,
        prefix -> Text,
        hash -> Text,
        created_at -> BigInt,
        last_used_at -> Nullable<BigInt>,
        revoked_at -> Nullable<BigInt>,
        scopes -> Text,
        parent_id -> Nullable<Text>,
    }
}

diesel::table! {
    usage_daily (flow_id, day) {
        flow_id -> Text,
        day -> Text,
        runs -> BigInt,
        node_executions -> BigInt,
        tokens -> BigInt,
    }
}

diesel::table! {
    usage_tokens (flow_id, day, model) {
        flow_id -> Text,
        day -> Text,
        model -> Text,
        prompt_tokens -> BigInt,
        completion_tokens -> BigInt,
    }
}

diesel::table! {
    files (id) {
        id -> Text,
        name -> Text,
        content_type -> Text,
        size -> BigInt,
        blob_key -> Text,
        created_at -> BigInt,
    }
}

diesel::table! {
    schedule_fires (schedule_id, fire_at) {
        schedule_id -> Text,
        fire_at -> BigInt,
        run_id -> Nullable<Text>,
        created_at -> BigInt,
    }
}

diesel::table! {
    run_actions (id) {
        id -> BigInt,
        run_id -> Text,
        action -> Text,
    }
}

diesel::allow_tables_to_appear_in_same_query!(
    flows,
    flow_versions,
    runs,
    steps,
    signals,
    wait_keys,
    map_items,
    run_actions
);
