"""An external system listening to imgpipe's events with its own queue (aio-pika)."""

import asyncio
import json

import aio_pika

ROUTING_KEYS = ("request.received", "image.processed", "request.completed")


async def listen(
    amqp_url, on_event, queue_name="my-system.imgpipe", exchange_name="imgpipe.events"
):
    connection = await aio_pika.connect_robust(amqp_url)
    async with connection:
        channel = await connection.channel()
        exchange = await channel.get_exchange(exchange_name)  # declared by imgpipe
        queue = await channel.declare_queue(queue_name, durable=True)
        for key in ROUTING_KEYS:
            await queue.bind(exchange, key)
        async with queue.iterator() as messages:
            async for message in messages:
                async with message.process():  # acks when the block succeeds
                    event = json.loads(message.body)  # a CloudEvents 1.0 envelope
                    await on_event(event)


if __name__ == "__main__":

    async def show(event):
        print(event["type"], event["subject"], event["id"])

    asyncio.run(listen("amqp://guest:guest@127.0.0.1:5672/", show))
