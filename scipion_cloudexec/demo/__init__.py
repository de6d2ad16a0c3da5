"""The demo: RELION 2D classification of a Scipion project on a separate cluster host
(``python -m scipion_cloudexec.demo``; ``scripts/demo.sh`` installs what it needs first)."""
