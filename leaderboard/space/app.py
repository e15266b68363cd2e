"""Hugging Face Space entry point of the moecap leaderboard.

The template that ``moecap leaderboard [RESULTS] --write-space OUT`` copies into a generated Space
(see README.md here); the Space imports moecap from the copy unpacked next to this file. It serves
the records named by the Space variable ``MOECAP_RESULTS``: a folder in the Space, or
``hf://datasets/<org>/<name>`` (the results repo that ``moecap publish --to`` pushes to); without it,
``DEFAULT_RESULTS`` (the RESULTS it was written with).
"""

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from moecap.leaderboard.app import build_app  # noqa: E402

DEFAULT_RESULTS = None
RESULTS = os.environ.get("MOECAP_RESULTS") or DEFAULT_RESULTS
if not RESULTS:
    raise SystemExit(
        "set the Space variable MOECAP_RESULTS to the results to show: "
        "hf://datasets/<org>/<name> (what `moecap publish --to` pushed to) or a folder"
    )

demo = build_app(RESULTS)

if __name__ == "__main__":
    # Spaces run `python app.py`; they route traffic to 0.0.0.0:7860
    demo.queue().launch(server_name=os.environ.get("GRADIO_SERVER_NAME", "0.0.0.0"),
                        server_port=int(os.environ.get("GRADIO_SERVER_PORT", "7860")))
