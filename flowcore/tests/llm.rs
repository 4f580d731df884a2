//! `llm_chat` against an OpenAI-compatible server on loopback (`flowcore::testkit::openai`):
//! streamed tokens, tools as flows with arguments split across chunks, JSON answers and their
//! schema, 429 with Retry-After, a stream cut mid-JSON, cancellation mid-stream, the usage
//! chunk, and checkpoints that spare a resumed run the model calls it had finished.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use flowcore::durable::{self, DurableOptions, Hooks};
use flowcore::ports::memory::{MemoryFlowStore, MemoryRunStore};
use flowcore::ports::{FlowStore, NewRun, RunStore};
use flowcore::testkit::openai::{FakeLlm, Reply};
use flowcore::{Engine, FlowDef, RunEvent, RunOptions, RunStatus};
use serde_json::{Value, json};

fn local() -> flowcore::net::Guard {
    flowcore::net::Guard::parse(None, Some("127.0.0.1/32")).unwrap()
}

/// An engine that reaches loopback, with `tools` stored as flows.
async fn engine(tools: &[Value]) -> Engine {
    let flows = Arc::new(MemoryFlowStore::new());
    for tool in tools {
        let def: FlowDef = serde_json::from_value(tool.clone()).unwrap();
        flows.create(&def).await.unwrap();
    }
    Engine::builder()
        .http_guard(local())
        .flow_store(flows)
        .build()
}

fn chat(server: &FakeLlm, extra: Value) -> Value {
    let mut params = json!({"base_url": server.base_url(), "model": "fake-1",
        "messages": [{"role": "system", "content": "Be brief."},
                     {"role": "user", "content": "{{ input.q }}"}]});
    for (k, v) in extra.as_object().unwrap() {
        params[k] = v.clone();
    }
    json!({"nodes": [{"id": "ask", "type": "llm_chat", "params": params}]})
}

/// Runs `flow` with `input`, collecting its events.
async fn run(engine: &Engine, flow: Value, input: Value) -> (flowcore::RunResult, Vec<RunEvent>) {
    let plan = common::compile(engine, flow);
    let events = Arc::new(Mutex::new(Vec::new()));
    let seen = events.clone();
    let sink: Arc<dyn flowcore::EventSink> = Arc::new(move |e: &RunEvent| {
        seen.lock().unwrap().push(e.clone());
    });
    let options = RunOptions {
        events: Some(sink),
        ..RunOptions::default()
    };
    let result = engine.execute(&plan, input, options).await;
    let events = events.lock().unwrap().clone();
    (result, events)
}

fn tokens(events: &[RunEvent]) -> Vec<(String, u32, u32)> {
    events
        .iter()
        .filter_map(|e| match e {
            RunEvent::Token {
                delta,
                turn,
                attempt,
                ..
            } => Some((delta.clone(), *turn, *attempt)),
            _ => None,
        })
        .collect()
}

#[tokio::test]
async fn a_streamed_answer_goes_out_token_by_token_and_the_output_has_usage() {
    let server = FakeLlm::start(|_| Reply::text("fake-1-0613", &["Hel", "lo", " there"])).await;
    let engine = engine(&[]).await;
    let (result, events) = run(
        &engine,
        chat(&server, json!({"temperature": 0.2, "max_tokens": 64})),
        json!({"q": "Hi?"}),
    )
    .await;
    assert_eq!(result.status, RunStatus::Succeeded, "{:?}", result.error);
    let out = result.output.unwrap();
    assert_eq!(out["content"], "Hello there");
    assert_eq!(out["model"], "fake-1-0613", "the model that answered");
    assert_eq!(out["finish_reason"], "stop");
    assert_eq!(
        out["usage"],
        json!({"prompt_tokens": 10, "completion_tokens": 3, "total_tokens": 13})
    );
    assert_eq!(out["tool_calls"], json!([]));
    assert_eq!(
        tokens(&events),
        vec![
            ("Hel".to_owned(), 1, 1),
            ("lo".to_owned(), 1, 1),
            (" there".to_owned(), 1, 1)
        ]
    );
    let usage: Vec<_> = events
        .iter()
        .filter(|e| matches!(e, RunEvent::LlmUsage { .. }))
        .collect();
    assert_eq!(usage.len(), 1);
    // What went over the wire.
    let sent = server.requests();
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].path, "/v1/chat/completions");
    let body = &sent[0].body;
    assert_eq!(body["model"], "fake-1");
    assert_eq!(body["stream"], true);
    assert_eq!(body["stream_options"], json!({"include_usage": true}));
    assert_eq!(body["temperature"], 0.2);
    assert_eq!(body["max_tokens"], 64);
    assert_eq!(
        body["messages"],
        json!([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}])
    );
    assert!(body.get("tools").is_none());
}

#[tokio::test]
async fn tools_are_flows_whose_arguments_arrive_in_pieces_and_whose_output_goes_back() {
    let lookup = json!({"id": "lookup_order", "nodes": [{"id": "found", "type": "set",
        "params": {"fields": {"order": "{{ input.id }}", "state": "shipped"}}}]});
    let refund = json!({"id": "refund", "nodes": [{"id": "r", "type": "set",
        "params": {"fields": {"refunded": "{{ input.amount }}"}}}]});
    let engine = engine(&[lookup, refund]).await;
    let server = FakeLlm::start(|requests| match requests.len() {
        1 => Reply::tool_calls(
            "fake-1",
            &[
                ("call_a", "lookup_order", r#"{"id": "A-17"}"#),
                ("call_b", "refund", r#"{"amount": 12}"#),
            ],
            3,
        ),
        _ => Reply::text("fake-1", &["Order A-17 shipped."]),
    })
    .await;
    let tools = json!([
        {"name": "lookup_order", "flow_id": "lookup_order", "description": "Finds an order.",
         "parameters": {"type": "object", "properties": {"id": {"type": "string"}}, "required": ["id"]}},
        {"name": "refund", "flow_id": "refund",
         "parameters": {"type": "object", "properties": {"amount": {"type": "number"}}, "required": ["amount"]}}
    ]);
    let (result, events) = run(
        &engine,
        chat(&server, json!({"tools": tools})),
        json!({"q": "Where is A-17?"}),
    )
    .await;
    assert_eq!(result.status, RunStatus::Succeeded, "{:?}", result.error);
    let out = result.output.unwrap();
    assert_eq!(out["content"], "Order A-17 shipped.");
    assert_eq!(
        out["tool_calls"],
        json!([
            {"name": "lookup_order", "arguments": {"id": "A-17"}, "output": {"order": "A-17", "state": "shipped"}},
            {"name": "refund", "arguments": {"amount": 12}, "output": {"refunded": 12}}
        ])
    );
    assert_eq!(out["usage"]["prompt_tokens"], 30, "both calls counted");
    let sent = server.requests();
    assert_eq!(sent.len(), 2);
    assert_eq!(
        sent[0].body["tools"][0],
        json!({"type": "function", "function": {"name": "lookup_order",
            "description": "Finds an order.",
            "parameters": {"type": "object", "properties": {"id": {"type": "string"}}, "required": ["id"]}}})
    );
    // The second call carries the assistant's tool calls and each tool's answer.
    let messages = sent[1].body["messages"].as_array().unwrap();
    assert_eq!(messages.len(), 5, "{messages:?}");
    assert_eq!(messages[2]["role"], "assistant");
    assert_eq!(messages[2]["tool_calls"][0]["id"], "call_a");
    assert_eq!(
        messages[2]["tool_calls"][0]["function"],
        json!({"name": "lookup_order", "arguments": "{\"id\": \"A-17\"}"})
    );
    assert_eq!(
        messages[3],
        json!({"role": "tool", "tool_call_id": "call_a", "content": "{\"order\":\"A-17\",\"state\":\"shipped\"}"})
    );
    assert_eq!(messages[4]["tool_call_id"], "call_b");
    let turns: Vec<u32> = tokens(&events).iter().map(|t| t.1).collect();
    assert_eq!(
        turns,
        vec![2],
        "the answer streamed in the second model call"
    );
}

#[tokio::test]
async fn bad_tool_arguments_go_back_to_the_model_and_max_iterations_bounds_the_calls() {
    let engine = engine(&[json!({"id": "t", "nodes": [{"id": "n", "type": "noop"}]})]).await;
    // Always asks for the tool, with arguments that break its schema.
    let server =
        FakeLlm::start(|_| Reply::tool_calls("fake-1", &[("c", "t", r#"{"id": 5}"#)], 4)).await;
    let tools = json!([{"name": "t", "flow_id": "t",
        "parameters": {"type": "object", "properties": {"id": {"type": "string"}}}}]);
    let (result, _) = run(
        &engine,
        chat(&server, json!({"tools": tools, "max_iterations": 3})),
        json!({"q": "x"}),
    )
    .await;
    assert_eq!(result.status, RunStatus::Failed);
    let error = result.error.unwrap();
    assert!(error.contains("after 3 model calls"), "{error}");
    let sent = server.requests();
    assert_eq!(sent.len(), 3);
    let told = sent[1].body["messages"][3]["content"].as_str().unwrap();
    assert!(
        told.contains("do not match the tool's parameters"),
        "the model is told: {told}"
    );
}

#[tokio::test]
async fn a_json_schema_answer_is_parsed_and_one_that_breaks_it_fails_the_node() {
    let format = json!({"type": "json_schema", "json_schema": {"name": "triage", "strict": true,
        "schema": {"type": "object", "properties": {"label": {"enum": ["bug", "question"]}},
                   "required": ["label"], "additionalProperties": false}}});
    let engine = engine(&[]).await;
    let good = FakeLlm::start(|_| Reply::text("m", &["{\"label\"", ": \"bug\"}"])).await;
    let (result, _) = run(
        &engine,
        chat(&good, json!({"response_format": format})),
        json!({"q": "It crashes"}),
    )
    .await;
    assert_eq!(result.status, RunStatus::Succeeded, "{:?}", result.error);
    assert_eq!(result.output.unwrap()["json"], json!({"label": "bug"}));
    assert_eq!(good.requests()[0].body["response_format"], format);

    let bad = FakeLlm::start(|_| Reply::text("m", &["{\"label\": \"rant\"}"])).await;
    let (result, _) = run(
        &engine,
        chat(&bad, json!({"response_format": format})),
        json!({"q": "x"}),
    )
    .await;
    assert_eq!(result.status, RunStatus::Failed);
    assert!(
        result.error.as_deref().unwrap().contains("does not match"),
        "{:?}",
        result.error
    );
    assert_eq!(bad.requests().len(), 1, "a schema violation is not retried");

    let prose = FakeLlm::start(|_| Reply::text("m", &["Sure! It is a bug."])).await;
    let (result, _) = run(
        &engine,
        chat(&prose, json!({"response_format": {"type": "json_object"}})),
        json!({"q": "x"}),
    )
    .await;
    assert!(
        result.error.as_deref().unwrap().contains("not JSON"),
        "{:?}",
        result.error
    );
}

#[tokio::test]
async fn a_429_waits_its_retry_after_and_each_attempt_streams_under_its_number() {
    let engine = engine(&[]).await;
    let server = FakeLlm::start(|requests| match requests.len() {
        1 => Reply::rate_limited("1"),
        _ => Reply::text("m", &["ok"]),
    })
    .await;
    let started = Instant::now();
    let (result, events) = run(&engine, chat(&server, json!({})), json!({"q": "x"})).await;
    assert_eq!(result.status, RunStatus::Succeeded, "{:?}", result.error);
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "Retry-After was honoured"
    );
    assert_eq!(tokens(&events), vec![("ok".to_owned(), 1, 2)], "attempt 2");

    // Three attempts by default, then the error names the answer.
    let always = FakeLlm::start(|_| Reply::Status {
        code: 503,
        retry_after: None,
        body: json!({"error": {"message": "overloaded"}}),
    })
    .await;
    let (result, _) = run(&engine, chat(&always, json!({})), json!({"q": "x"})).await;
    assert_eq!(always.requests().len(), 3);
    let error = result.error.unwrap();
    assert!(
        error.contains("HTTP 503") && error.contains("overloaded"),
        "{error}"
    );

    // A Retry-After past what the node waits fails at once; a 401 is not retried.
    let later = FakeLlm::start(|_| Reply::rate_limited("3600")).await;
    let (result, _) = run(&engine, chat(&later, json!({})), json!({"q": "x"})).await;
    assert_eq!(later.requests().len(), 1);
    assert!(result.error.unwrap().contains("retry after 3600 s"));
    let denied = FakeLlm::start(|_| Reply::Status {
        code: 401,
        retry_after: None,
        body: json!({"error": {"message": "Incorrect API key provided"}}),
    })
    .await;
    let (result, _) = run(&engine, chat(&denied, json!({})), json!({"q": "x"})).await;
    assert_eq!(denied.requests().len(), 1);
    assert!(result.error.unwrap().contains("Incorrect API key"));
}

#[tokio::test]
async fn a_stream_cut_mid_json_fails_with_a_clear_error() {
    let engine = engine(&[]).await;
    let server = FakeLlm::start(|_| match Reply::text("m", &["par", "tial"]) {
        Reply::Stream {
            mut events, gap, ..
        } => {
            events.truncate(3);
            Reply::Stream {
                events,
                gap,
                cut: true,
            }
        }
        other => other,
    })
    .await;
    let (result, events) = run(&engine, chat(&server, json!({})), json!({"q": "x"})).await;
    assert_eq!(result.status, RunStatus::Failed);
    let error = result.error.unwrap();
    assert!(
        error.contains("stream was cut") || error.contains("malformed stream"),
        "{error}"
    );
    assert_eq!(server.requests().len(), 3, "retried as a transient failure");
    assert_eq!(tokens(&events).len(), 6, "each attempt streamed its pieces");
}

#[tokio::test]
async fn cancelling_the_run_closes_the_stream_at_once() {
    let engine = engine(&[]).await;
    let parts: Vec<String> = (0..200).map(|i| format!("t{i} ")).collect();
    let server = FakeLlm::start(move |_| {
        let parts: Vec<&str> = parts.iter().map(String::as_str).collect();
        Reply::text("m", &parts).slowly(Duration::from_millis(50))
    })
    .await;
    let plan = common::compile(&engine, chat(&server, json!({})));
    let cancel = flowcore::CancellationToken::new();
    let options = RunOptions {
        cancel: Some(cancel.clone()),
        ..RunOptions::default()
    };
    let handle = tokio::spawn({
        let engine = engine.clone();
        async move { engine.execute(&plan, json!({"q": "x"}), options).await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let cancelled = Instant::now();
    cancel.cancel();
    let result = handle.await.unwrap();
    assert_eq!(result.status, RunStatus::Cancelled);
    assert!(
        cancelled.elapsed() < Duration::from_secs(2),
        "the run ended without waiting for the stream: {:?}",
        cancelled.elapsed()
    );
}

#[tokio::test]
async fn a_resumed_run_does_not_call_the_model_again_for_turns_it_had_finished() {
    let engine = engine(&[json!({"id": "slow_tool", "nodes": [
        {"id": "d", "type": "delay", "params": {"ms": 300}},
        {"id": "out", "type": "set", "params": {"fields": {"ok": true}}}
    ], "edges": [{"from": "d", "to": "out"}]})])
    .await;
    let server = FakeLlm::start(|requests| {
        // The first call asks for the tool; any later one answers.
        if requests.len() == 1 {
            Reply::tool_calls("m", &[("c1", "slow_tool", "{}")], 8)
        } else {
            Reply::text("m", &["done"])
        }
    })
    .await;
    let tools = json!([{"name": "slow_tool", "flow_id": "slow_tool"}]);
    let plan = common::compile(&engine, chat(&server, json!({"tools": tools})));
    let runs: Arc<dyn RunStore> = Arc::new(MemoryRunStore::new());
    let options = DurableOptions::new("w1");
    let new = NewRun::new("f", 1, json!({"q": "x"})).claimed(options.claim());
    let (run, _) = runs.create(new).await.unwrap();
    // The worker is handed back while the tool runs: the model call is checkpointed.
    let hand_back = flowcore::CancellationToken::new();
    let stopper = tokio::spawn({
        let (runs, id, hand_back) = (runs.clone(), run.id.clone(), hand_back.clone());
        async move {
            for _ in 0..400 {
                if !runs.items(&id, "ask").await.unwrap().is_empty() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            hand_back.cancel();
        }
    });
    let hooks = Hooks {
        hand_back: Some(hand_back),
        ..Hooks::default()
    };
    let handed = durable::execute(&engine, &plan, &runs, &run, &options, hooks)
        .await
        .unwrap();
    stopper.await.unwrap();
    assert_eq!(handed.status, RunStatus::Queued, "handed back");
    assert_eq!(server.requests().len(), 1);

    let run = runs
        .claim_run(&run.id, "w2", Duration::from_secs(30))
        .await
        .unwrap();
    let done = durable::execute(
        &engine,
        &plan,
        &runs,
        &run,
        &DurableOptions::new("w2"),
        Hooks::default(),
    )
    .await
    .unwrap();
    assert_eq!(done.status, RunStatus::Succeeded, "{:?}", done.error);
    assert_eq!(
        server.requests().len(),
        2,
        "the finished model call was not paid for again"
    );
    let out = done.output.unwrap();
    assert_eq!(out["content"], "done");
    assert_eq!(out["tool_calls"][0]["output"], json!({"ok": true}));
    assert_eq!(out["usage"]["prompt_tokens"], 30, "both calls' usage");
    assert!(
        runs.items(&run.id, "ask").await.unwrap().is_empty(),
        "cleared"
    );
}

#[tokio::test]
async fn the_guard_refuses_a_model_server_it_denies_and_names_the_setting() {
    let server = FakeLlm::start(|_| Reply::text("m", &["x"])).await;
    let engine = Engine::new(); // the default deny list: loopback is refused
    let (result, _) = run(&engine, chat(&server, json!({})), json!({"q": "x"})).await;
    assert_eq!(result.status, RunStatus::Failed);
    let error = result.error.unwrap();
    assert!(
        error.contains("FLOWCORE_HTTP_ALLOW") || error.contains("denied"),
        "{error}"
    );
    assert!(server.requests().is_empty());
}

/// The stand-in's wire format, read by the official `openai` Python client
/// (`FLOWCORE_OPENAI_PYTHON`, a Python with `openai` installed; `.ci/run` makes one), which
/// validates each chunk against its `ChatCompletionChunk` type.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stand_in_speaks_the_format_the_official_openai_client_reads() {
    let server = FakeLlm::start(|requests| match requests.len() {
        1 => Reply::text("fake-1", &["Hel", "lo"]),
        2 => Reply::tool_calls("fake-1", &[("call_9", "lookup", r#"{"q": "x"}"#)], 3),
        _ => Reply::rate_limited("7"),
    })
    .await;
    let python = std::env::var("FLOWCORE_OPENAI_PYTHON").unwrap_or_else(|_| "python3".into());
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/openai/check_stream.py");
    let base_url = server.base_url();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(&python)
            .arg(script)
            .arg(&base_url)
            .output()
            .unwrap_or_else(|e| panic!("{python} did not start ({e}): set FLOWCORE_OPENAI_PYTHON to a Python with `openai`"))
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "the openai client failed (is `openai` installed? FLOWCORE_OPENAI_PYTHON): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cases: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(cases.len(), 3, "{cases:?}");
    assert_eq!(cases[0]["content"], "Hello");
    assert_eq!(cases[0]["finish_reason"], "stop");
    assert_eq!(cases[0]["model"], "fake-1");
    assert_eq!(cases[0]["usage"]["prompt_tokens"], 10);
    assert_eq!(cases[0]["usage"]["total_tokens"], 12);
    assert_eq!(
        cases[1]["calls"],
        json!([{"id": "call_9", "name": "lookup", "arguments": "{\"q\": \"x\"}"}])
    );
    assert_eq!(cases[1]["finish_reason"], "tool_calls");
    assert_eq!(cases[2]["raised"], "RateLimitError");
    assert_eq!(cases[2]["status"], 429);
    assert_eq!(cases[2]["retry_after"], "7");
    assert!(
        cases[2]["message"]
            .as_str()
            .unwrap()
            .contains("Rate limit reached"),
        "{}",
        cases[2]
    );
}

/// An example flow of `examples/flows/`, its model server pointed at `server`.
fn example(text: &str, server: &FakeLlm) -> Value {
    let mut flow: Value = serde_json::from_str(text).unwrap();
    for node in flow["nodes"].as_array_mut().unwrap() {
        if node["type"] == "llm_chat" {
            node["params"]["base_url"] = json!(server.base_url());
        }
    }
    flow
}

#[tokio::test]
async fn the_support_triage_example_classifies_branches_and_summarizes() {
    let server = FakeLlm::start(|requests| {
        let last = &requests[requests.len() - 1].body;
        if last.get("response_format").is_some() {
            Reply::text(
                "llama3.2",
                &["{\"category\": \"bug\", ", "\"urgent\": true}"],
            )
        } else {
            Reply::text("llama3.2", &["Export crashes ", "on large files."])
        }
    })
    .await;
    let engine = engine(&[]).await;
    let flow = example(
        include_str!("../../examples/flows/support_triage.json"),
        &server,
    );
    let (result, _) = run(
        &engine,
        flow,
        json!({"customer": "ada@example.com", "ticket": "Export crashes with 2 GB files!"}),
    )
    .await;
    assert_eq!(result.status, RunStatus::Succeeded, "{:?}", result.error);
    let out = result.output.unwrap();
    assert_eq!(out["queue"], "engineering", "{out}");
    assert_eq!(out["summary"], "Export crashes on large files.");
    assert_eq!(server.requests().len(), 2);
}

#[tokio::test]
async fn the_order_agent_example_calls_its_tool_flows() {
    let tools = [
        serde_json::from_str(include_str!("../../examples/flows/tools/lookup_order.json")).unwrap(),
        serde_json::from_str(include_str!("../../examples/flows/tools/refund_order.json")).unwrap(),
    ];
    let engine = engine(&tools).await;
    let server = FakeLlm::start(|requests| match requests.len() {
        1 => Reply::tool_calls(
            "llama3.2",
            &[("c1", "lookup_order", r#"{"order_id": "A-200"}"#)],
            5,
        ),
        2 => Reply::tool_calls(
            "llama3.2",
            &[(
                "c2",
                "refund_order",
                r#"{"order_id": "A-200", "reason": "damaged"}"#,
            )],
            5,
        ),
        _ => Reply::text("llama3.2", &["Refunded A-200."]),
    })
    .await;
    let flow = example(
        include_str!("../../examples/flows/order_agent.json"),
        &server,
    );
    let (result, _) = run(
        &engine,
        flow,
        json!({"message": "A-200 arrived broken, refund please"}),
    )
    .await;
    assert_eq!(result.status, RunStatus::Succeeded, "{:?}", result.error);
    let out = result.output.unwrap();
    assert_eq!(out["content"], "Refunded A-200.");
    assert_eq!(
        out["tool_calls"][0]["output"],
        json!({"found": true, "order_id": "A-200", "state": "delivered", "amount": 42.5})
    );
    assert_eq!(out["tool_calls"][1]["output"]["refunded"], true);
}

#[tokio::test]
async fn a_conversation_that_outgrows_the_output_limit_fails_instead_of_growing() {
    let flows = Arc::new(MemoryFlowStore::new());
    let big = json!({"id": "big", "nodes": [{"id": "b", "type": "set",
        "params": {"fields": {"text": "x".repeat(1500)}}}]});
    flows
        .create(&serde_json::from_value::<FlowDef>(big).unwrap())
        .await
        .unwrap();
    let engine = Engine::builder()
        .http_guard(local())
        .flow_store(flows)
        .limits(flowcore::Limits {
            max_output_bytes: 4096,
            ..flowcore::Limits::default()
        })
        .build();
    let server = FakeLlm::start(|_| Reply::tool_calls("m", &[("c", "big", "{}")], 8)).await;
    let tools = json!([{"name": "big", "flow_id": "big"}]);
    let (result, _) = run(
        &engine,
        chat(&server, json!({"tools": tools, "max_iterations": 20})),
        json!({"q": "x"}),
    )
    .await;
    assert_eq!(result.status, RunStatus::Failed);
    let error = result.error.unwrap();
    assert!(
        error.contains("conversation grew past 4096 bytes"),
        "{error}"
    );
    assert!(server.requests().len() < 5, "{}", server.requests().len());
}

#[tokio::test]
async fn a_server_sending_a_byte_a_chunk_gets_its_pieces_gathered_past_4096_events() {
    let engine = engine(&[]).await;
    let server = FakeLlm::start(|_| {
        let parts = vec!["a"; 5_000];
        Reply::text("m", &parts)
    })
    .await;
    let (result, events) = run(&engine, chat(&server, json!({})), json!({"q": "x"})).await;
    assert_eq!(result.status, RunStatus::Succeeded, "{:?}", result.error);
    let tokens = tokens(&events);
    assert_eq!(tokens.len(), 4_097, "4,096 pieces, then the rest in one");
    assert_eq!(tokens.last().unwrap().0.len(), 904);
    let text: String = tokens.iter().map(|t| t.0.as_str()).collect();
    assert_eq!(text, result.output.unwrap()["content"].as_str().unwrap());
}

#[tokio::test]
async fn tool_calls_are_matched_by_position_when_a_server_reuses_their_ids() {
    let engine = engine(&[json!({"id": "echo", "nodes": [{"id": "e", "type": "set",
        "params": {"fields": {"got": "{{ input.n }}"}}}]})])
    .await;
    let server = FakeLlm::start(|requests| match requests.len() {
        1 => Reply::tool_calls("m", &[("call_0", "echo", r#"{"n": 1}"#)], 4),
        2 => Reply::tool_calls("m", &[("call_0", "echo", r#"{"n": 2}"#)], 4),
        _ => Reply::text("m", &["done"]),
    })
    .await;
    let tools = json!([{"name": "echo", "flow_id": "echo"}]);
    let (result, _) = run(
        &engine,
        chat(&server, json!({"tools": tools})),
        json!({"q": "x"}),
    )
    .await;
    assert_eq!(result.status, RunStatus::Succeeded, "{:?}", result.error);
    let out = result.output.unwrap();
    assert_eq!(out["tool_calls"][1]["output"], json!({"got": 2}), "{out}");
    let third = &server.requests()[2].body["messages"];
    assert_eq!(
        third.as_array().unwrap().len(),
        6,
        "both answers and both results: {third}"
    );
}
