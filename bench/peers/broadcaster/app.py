"""FastAPI + broadcaster, as a peer for `pgrelay bench --peer`.

`ws://127.0.0.1:PORT/ws/{channel}` pushes every NOTIFY payload of `channel`, as sent, to the
WebSocket client (broadcaster's postgres backend: one asyncpg connection LISTENs, one queue
per subscriber). Run with `DATABASE_URL=postgres://… uvicorn app:app --port PORT`.
"""

import os
from contextlib import asynccontextmanager

import anyio
from broadcaster import Broadcast
from fastapi import FastAPI, WebSocket, WebSocketDisconnect

broadcast = Broadcast(os.environ["DATABASE_URL"])


@asynccontextmanager
async def lifespan(_app: FastAPI):
    await broadcast.connect()
    yield
    await broadcast.disconnect()


app = FastAPI(lifespan=lifespan)


@app.websocket("/ws/{channel}")
async def stream(websocket: WebSocket, channel: str) -> None:
    await websocket.accept()

    async def forward() -> None:
        async with broadcast.subscribe(channel=channel) as subscriber:
            async for event in subscriber:
                await websocket.send_text(event.message)

    async with anyio.create_task_group() as tasks:
        tasks.start_soon(forward)
        # Until the client goes (it sends nothing): then stop forwarding.
        try:
            while True:
                await websocket.receive_text()
        except WebSocketDisconnect:
            pass
        tasks.cancel_scope.cancel()
