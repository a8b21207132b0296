"""The flags of the checkpoint subcommands (``push``, ``compress``, ``decompress``) and of
``prune --push-to-hub``; :mod:`.commands` runs them through the Python API."""

from __future__ import annotations

import argparse

COMMANDS = ("push", "compress", "decompress")


def add_parsers(sub, prune_parser: argparse.ArgumentParser) -> None:
    """Add the subcommands to ``sub`` and the push options to ``prune``."""
    prune_parser.add_argument("--push-to-hub", metavar="REPO_ID", default=None,
                              help="After saving, push --output to this Hub repo (OWNER/NAME) with its model card; "
                              "the token comes from HF_TOKEN or `hf auth login`.")
    prune_parser.add_argument("--private", action="store_true", default=None,
                              help="With --push-to-hub: create the repo private (when it does not exist yet).")

    p = sub.add_parser("push", help="upload a pruned checkpoint and its model card to the Hugging Face Hub",
                       description="Upload FOLDER (written by llmprune prune or compress) to REPO_ID in one commit, "
                       "creating the repo if missing, with a model card generated from its metadata and results. "
                       "The token comes from HF_TOKEN or the login cache (`hf auth login`).")
    p.add_argument("folder", metavar="FOLDER", help="Checkpoint folder written by llmprune.")
    p.add_argument("repo_id", metavar="REPO_ID", help="Hub repo, OWNER/NAME.")
    p.add_argument("--private", action="store_true", default=None, help="Create the repo private (if new).")
    p.add_argument("--revision", metavar="BRANCH", help="Branch to commit to (created if missing); default main.")
    p.add_argument("--message", "-m", metavar="TEXT", help="Commit message.")
    p.add_argument("--create-pr", action="store_true", help="Open a pull request instead of committing.")
    p.add_argument("--license", metavar="ID", help="Licence for the card when the base model's is unknown "
                   "(e.g. apache-2.0).")

    c = sub.add_parser("compress", help="write a compressed sparse copy of a pruned checkpoint",
                       description="Write SRC's weights as kept values plus a packed bitmask (unstructured) or packed "
                       "N:M indices into DST; dense tensors stay as they are. DST loads with llmprune.load; "
                       "plain transformers refuses it with a message.")
    c.add_argument("src", metavar="SRC", help="Dense checkpoint folder (safetensors).")
    c.add_argument("dst", metavar="DST", help="Folder to write.")
    c.add_argument("--pattern", metavar="N:M", help="N:M pattern to encode (default: the one in SRC's metadata).")
    c.add_argument("--overwrite", action="store_true", help="Replace DST if it exists.")

    d = sub.add_parser("decompress", help="write a dense copy of a compressed checkpoint (loads with transformers)",
                       description="Write SRC's weights dense into DST, bit-identical to the weights compressed.")
    d.add_argument("src", metavar="SRC", help="Compressed checkpoint folder.")
    d.add_argument("dst", metavar="DST", help="Folder to write.")
    d.add_argument("--overwrite", action="store_true", help="Replace DST if it exists.")
    for q in (p, c, d):
        q.add_argument("--quiet", "-q", action="store_true", help="Warnings and errors only.")
        q.add_argument("--verbose", "-v", action="store_true", help="Debug logging.")
