// Sending grants built from stored descriptors; what the channel did not take is granted again.
import type { Descriptor } from '../descriptors.ts';
import type { FlowKey, Grant, GrantChannel, GrantFlow, Log, Regrant } from './ports.ts';

/** Sends grants; the ones the channel did not take are marked to grant again (the tick sends them). */
export async function sendGrants(
  deps: { channel: Pick<GrantChannel, 'send'>; flow: Pick<GrantFlow, 'control'>; log: Log },
  key: FlowKey,
  grants: readonly { seq: number; attempt: number; repair?: boolean }[],
  descriptors: ReadonlyMap<number, Descriptor>,
): Promise<number> {
  const messages: Grant[] = grants.map((g) => {
    const d = descriptors.get(g.seq)!;
    return {
      set: key.set,
      cycleId: key.cycleId,
      disk: key.disk,
      descriptor: { seq: d.seq, offset: d.offset, length: d.length, extents: d.extents, bytes: d.bytes },
      attempt: g.attempt,
      ...(g.repair === true ? { repair: true } : {}),
    };
  });
  const { unsent } = await deps.channel.send(messages);
  if (unsent.length > 0) {
    deps.log.warn('grants not sent; they will be granted again', { disk: key.disk, unsent: unsent.length });
    // A repair is not in flight: the next tick finds it missing again and sends it again.
    const lost = unsent.filter((g) => g.repair !== true);
    if (lost.length === 0) return messages.length - unsent.length;
    const addRegrants = new Map<number, Regrant>(lost.map((g) => [g.descriptor.seq, { attempt: g.attempt }]));
    await deps.flow.control(key, { addRegrants });
  }
  return messages.length - unsent.length;
}
