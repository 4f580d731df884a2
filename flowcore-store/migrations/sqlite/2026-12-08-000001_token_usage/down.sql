DROP TABLE usage_tokens;
