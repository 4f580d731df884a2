-- LLM tokens per flow, day and model (the total stays in usage_daily.tokens).
CREATE TABLE usage_tokens (
    flow_id TEXT NOT NULL,
    day TEXT NOT NULL,
    model TEXT NOT NULL,
    prompt_tokens BIGINT NOT NULL DEFAULT 0,
    completion_tokens BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (flow_id, day, model)
);
