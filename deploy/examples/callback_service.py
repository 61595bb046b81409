"""A small external service for callback tasks, to try agentless by hand.

It accepts every invocation at once and prints the curl command that completes the task, the
way a real service would call back when its work is done:

    python deploy/examples/callback_service.py            # listens on 127.0.0.1:9000
"""

from __future__ import annotations

import argparse
import base64

from aiohttp import web


async def invoked(request: web.Request) -> web.Response:
    headers = request.headers
    events = f"{headers['PlanUrl']}/plans/{headers['PlanId']}/events"
    body = (
        f'{{"name": "TaskCompleted", "taskId": "{headers["TaskInstanceId"]}", '
        '"result": "succeeded"}'
    )
    basic = base64.b64encode(f":{headers['AuthToken']}".encode()).decode()
    print(
        f"task {headers['TaskInstanceId']} of plan {headers['PlanId']} invoked; complete it with:\n"
        f"  curl -sS -X POST {events} \\\n"
        f"    -H 'Authorization: Basic {basic}' \\\n"
        f"    -H 'Content-Type: application/json' -d '{body}'\n",
        flush=True,
    )
    return web.json_response({"accepted": True})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=9000)
    args = parser.parse_args()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", invoked)
    web.run_app(app, host="127.0.0.1", port=args.port, print=None)


if __name__ == "__main__":
    main()
