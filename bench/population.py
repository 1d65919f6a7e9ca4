"""Accounts and logged-in connections a benchmark needs before it measures anything."""

from __future__ import annotations

from . import load

PASSWORD = "bench-password-1"
SINKS = 16


async def make_sinks(reactor, targets, node_ids, prefix="sink", count=SINKS):
    """Recipients that never log in (no pushes), known on every node.

    Created through each node: in a replicated cluster the second try is
    ``username_taken``; independent single-node servers each get their own.
    """
    names = [f"{prefix}{i}" for i in range(count)]
    await load.bounded_gather(
        [load.make_account(reactor, targets, node_id, name, PASSWORD)
         for node_id in node_ids for name in names], limit=16)
    return names


async def logged_in_users(reactor, targets, homes, prefix, on_event=None, limit=32):
    """One ``PaxchatUser`` per home node in ``homes``, connected there and logged in."""
    users = [load.PaxchatUser(reactor, targets, f"{prefix}{i}", PASSWORD, on_event=on_event)
             for i in range(len(homes))]

    async def prepare(user, home):
        await user.connect(home)
        await user.ensure_account_and_login()

    try:
        await load.bounded_gather([prepare(u, h) for u, h in zip(users, homes)], limit=limit)
    except Exception:
        close_all(users)
        raise
    return users


def close_all(users):
    for user in users:
        user.close()


def writers(users, sinks, node_order):
    return [load.PaxchatWriter(user, sinks[i % len(sinks)], node_order)
            for i, user in enumerate(users)]


async def etcd_writers(reactor, cluster, homes, prefix):
    members = cluster.member_ids
    result = []
    for i, home in enumerate(homes):
        order = [home] + [m for m in members if m != home]
        writer = load.EtcdWriter(reactor, [cluster.address(m) for m in order], 0, f"{prefix}{i}")
        result.append(writer)
    await load.bounded_gather([w.connect() for w in result], limit=64)
    return result


def close_etcd(writers_):
    for w in writers_:
        if w.proto is not None and not w.proto.lost:
            w.proto.transport.abortConnection()


async def create_accounts(reactor, targets, node_id, names, per_connection=10, limit=16):
    """Create many accounts via ``node_id``, ``per_connection`` per connection.

    The server allows a burst of 10 password operations per connection, so
    creating thousands takes many short connections.
    """
    groups = [names[i:i + per_connection] for i in range(0, len(names), per_connection)]

    async def create_group(group):
        proto = await targets.connect(node_id)
        try:
            for name in group:
                deadline = load.now() + 300
                while True:
                    try:
                        await load.request(reactor, proto, "create_account",
                                           timeout=load.PASSWORD_TIMEOUT, username=name,
                                           password=PASSWORD)
                        break
                    except load.ServerError as e:
                        if e.code == "username_taken":
                            break
                        if e.code not in ("unavailable", "rate_limited") or load.now() > deadline:
                            raise
                        await load.sleep(reactor, 0.2)
        finally:
            proto.abort()

    await load.bounded_gather([create_group(g) for g in groups], limit=limit)


async def login_only(reactor, targets, homes, names, on_event=None, limit=32, leader_events=False):
    """Users of existing accounts, each connected to its home node and logged in
    (and following the leader, as the desktop app does, with ``leader_events``)."""
    users = [load.PaxchatUser(reactor, targets, name, PASSWORD, on_event=on_event(i) if on_event else None)
             for i, name in enumerate(names)]

    async def prepare(user, home):
        await user.connect(home)
        if leader_events:
            await load.request(reactor, user.proto, "hello", timeout=5, leader_events=True)
        result = await load.request(reactor, user.proto, "login", timeout=load.PASSWORD_TIMEOUT,
                                    username=user.username,
                                    password=user.password)
        user.session = result["session"]

    try:
        await load.bounded_gather([prepare(u, h) for u, h in zip(users, homes)], limit=limit)
    except Exception:
        close_all(users)
        raise
    return users
