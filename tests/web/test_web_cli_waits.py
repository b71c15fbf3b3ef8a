"""Waits from the command line: ``trioflow resume``, ``trioflow signal``, ``logs`` and ``run``.

The server is a real ``trioflow serve --samples`` process; the run is the
python-review sample waiting for its reviewer, as in the README.
"""

from __future__ import annotations

import json
import pathlib
import subprocess
from typing import Any

import httpx
import trio
from test_web_cli import TRIOFLOW, serving, trioflow, write

UNFIXABLE = "print('hi')\n"
ASK = {
    "id": "ask",
    "start_node": "ask",
    "nodes": [
        {
            "id": "ask",
            "wait": {
                "prompt": "Approve?",
                "input_schema": {
                    "type": "object",
                    "properties": {"approved": {"type": "boolean"}},
                    "required": ["approved"],
                    "additionalProperties": False,
                },
            },
        }
    ],
    "edges": [],
}


def out(result: subprocess.CompletedProcess[bytes]) -> str:
    return result.stdout.decode()


def err(result: subprocess.CompletedProcess[bytes]) -> str:
    return result.stderr.decode()


async def start_review(client: httpx.AsyncClient) -> dict[str, Any]:
    """A python-review run waiting for its reviewer."""
    r = await client.post(
        "/graph/run", json={"graph_id": "python-review", "initial_state": {"source": UNFIXABLE}}
    )
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    assert body["status"] == "waiting", body
    return body


async def test_logs_shows_the_prompt_and_resume_answers_it() -> None:
    with trio.fail_after(60):
        async with (
            serving("--samples", "--store", "memory://") as (url, _),
            httpx.AsyncClient(base_url=url) as client,
        ):
            run = await start_review(client)
            run_id = run["run_id"]
            request_id = run["waiting"]["request_id"]

            logs = await trioflow("logs", run_id, "--url", url)
            assert logs.returncode == 0, err(logs)
            text = out(logs)
            assert "run_waiting" in text
            assert run["waiting"]["prompt"] in text
            assert '"required":["approved"]' in text
            assert (
                f"answer: trioflow resume {run_id} --input '<JSON>' --request-id {request_id}"
                in (text)
            )
            assert "deadline: " in text  # the sample gives a reviewer seven days

            # Refused input: every problem with its path, exit 3, the run still waits.
            bad = await trioflow(
                "resume", run_id, "--input", '{"approved": "yes", "extra": 1}', "--url", url
            )
            assert bad.returncode == 3
            assert "approved" in err(bad) and "extra" in err(bad)
            assert (await client.get(f"/graph/state/{run_id}")).json()["status"] == "waiting"
            for args, message in [
                (("--input", "[1]"), "--input must be a JSON object"),
                (("--input", "{"), "--input is not JSON"),
                (("--input", "{}", "--request-id", "nope"), "is not waiting for request 'nope'"),
            ]:
                refused = await trioflow("resume", run_id, *args, "--url", url)
                assert refused.returncode == 3, err(refused)
                assert message in err(refused)

            done = await trioflow(
                "resume",
                run_id,
                "--input",
                '{"approved": true, "comment": "fine by me"}',
                "--request-id",
                request_id,
                "--wait",
                "--url",
                url,
            )
            assert done.returncode == 0, err(done)
            record = json.loads(out(done))
            assert record["status"] == "completed"
            assert record["state"]["verdict"] == "approved"
            assert record["state"]["comment"] == "fine by me"

            again = await trioflow("resume", run_id, "--input", '{"approved": true}', "--url", url)
            assert again.returncode == 3
            assert "it is completed" in err(again)


async def test_resume_without_wait_answers_at_once_and_logs_follow_sees_the_end() -> None:
    with trio.fail_after(60):
        async with (
            serving("--samples", "--store", "memory://") as (url, _),
            httpx.AsyncClient(base_url=url) as client,
        ):
            run_id = (await start_review(client))["run_id"]
            taken = await trioflow(
                "resume", run_id, "--input", '{"approved": false, "comment": "no"}', "--url", url
            )
            assert taken.returncode == 0, err(taken)
            assert json.loads(out(taken))["run_id"] == run_id
            followed = await trioflow("logs", run_id, "--follow", "--url", url)
            assert followed.returncode == 0, err(followed)
            assert "run_input" in out(followed)
            assert "run_completed" in out(followed)
            final = (await client.get(f"/graph/state/{run_id}")).json()
            assert final["state"]["verdict"] == "rejected"


async def test_signal_from_the_command_line() -> None:
    with trio.fail_after(60):
        async with (
            serving("--samples", "--store", "memory://") as (url, _),
            httpx.AsyncClient(base_url=url) as client,
        ):
            run_id = (await start_review(client))["run_id"]
            sent = await trioflow(
                "signal", run_id, "note", "--updates", '{"comment": "looked at it"}', "--url", url
            )
            assert sent.returncode == 0, err(sent)
            accepted = json.loads(out(sent))
            assert accepted["name"] == "note" and accepted["run_id"] == run_id
            state = (await client.get(f"/graph/state/{run_id}")).json()
            # Applied to the waiting run, which keeps waiting.
            assert state["status"] == "waiting"
            assert state["state"]["comment"] == "looked at it"
            assert any(e["event"] == "signal_received" for e in state["logs"])

            await client.post(f"/graph/cancel/{run_id}")
            late = await trioflow("signal", run_id, "note", "--url", url)
            assert late.returncode == 3
            assert "cancelled" in err(late)
            unknown = await trioflow("signal", "no-such-run", "note", "--url", url)
            assert unknown.returncode == 3
            not_object = await trioflow("signal", run_id, "note", "--updates", "3", "--url", url)
            assert not_object.returncode == 3
            assert "--updates must be a JSON object" in err(not_object)


async def test_resume_and_signal_say_when_the_server_is_unreachable() -> None:
    with trio.fail_after(30):
        for args in (
            ("resume", "r", "--input", "{}", "--url", "http://127.0.0.1:9"),
            ("signal", "r", "s", "--url", "http://127.0.0.1:9"),
        ):
            result = await trioflow(*args)
            assert result.returncode == 3
            assert "cannot reach http://127.0.0.1:9" in err(result)
            assert "Traceback" not in err(result)


async def run_answering(tmp_path: pathlib.Path, stdin: bytes) -> subprocess.CompletedProcess[bytes]:
    graph = write(tmp_path, "ask.json", ASK)
    with trio.fail_after(30):
        return await trio.run_process(
            [*TRIOFLOW, "run", graph],
            stdin=stdin,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )


async def test_run_reads_the_answer_from_stdin(tmp_path: pathlib.Path) -> None:
    result = await run_answering(tmp_path, b'\n{"approved": true}\n')
    assert result.returncode == 0, err(result)
    assert "Approve?" in err(result)
    assert "one JSON object on a line of stdin" in err(result)
    assert json.loads(out(result)) == {"approved": True}


async def test_run_cancels_when_stdin_ends_or_a_script_answers_wrong(
    tmp_path: pathlib.Path,
) -> None:
    ended = await run_answering(tmp_path, b"")
    assert ended.returncode == 2
    assert "stdin ended" in err(ended)
    assert "run_cancelled" in err(ended)

    wrong = await run_answering(tmp_path, b'{"approved": 1}\n{"approved": true}\n')
    assert wrong.returncode == 2
    assert "input refused: $.approved: Input should be a valid boolean" in err(wrong)
    assert "run_cancelled" in err(wrong)

    garbage = await run_answering(tmp_path, b"yes please\n")
    assert garbage.returncode == 2
    assert "not JSON" in err(garbage)
