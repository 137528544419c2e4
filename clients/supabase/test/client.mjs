// How the suite makes its supabase-js clients: as an application would, against the relay's
// URL (PGRELAY_URL, set by the runner). On Node 20, which has no WebSocket of its own,
// realtime-js is given the `ws` package as its transport.
import { createClient } from '@supabase/supabase-js'
import WebSocket from 'ws'

export const url = process.env.PGRELAY_URL
if (!url) {
  throw new Error('PGRELAY_URL is not set: run this suite through `cargo test --test integration clients::` or scripts/test.sh')
}

/** A client; `realtime` options (e.g. `{ vsn: '1.0.0' }`) go to realtime-js. */
export function client(key = 'anon-key', realtime = {}) {
  return createClient(url, key, {
    auth: { persistSession: false, autoRefreshToken: false },
    realtime: { transport: WebSocket, ...realtime },
  })
}
