DROP TABLE run_actions;
