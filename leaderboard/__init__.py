"""The Gradio leaderboard over ``results/`` (built in its own issue; nothing here yet)."""
