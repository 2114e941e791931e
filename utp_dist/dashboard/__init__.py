"""The web dashboard: projects, configs, the run queue, agents, and every run and sweep found under the output roots."""
