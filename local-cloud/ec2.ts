// The EC2 side of the local cloud: source "volumes" are buffers in memory, and CreateSnapshot writes a
// volume's blocks into a new snapshot of the EBS emulator (incremental over the volume's previous
// snapshot, so ListChangedBlocks between two of them lists what changed), completed in the background
// like EC2 does it. DescribeSnapshots and DeleteSnapshot answer in the EC2 API's shapes, for the state
// machine's SDK-integration states and, as an SDK-shaped module, for the finalizer's status reads.
import { createHash, randomBytes } from 'node:crypto';

/** 512 KiB: the EBS snapshot block. */
export const SNAPSHOT_BLOCK = 512 * 1024;
const GiB = 1024 ** 3;

export interface Ec2Tag {
  Key?: string;
  Value?: string;
}

/**
 * The slice of the EBS emulator's state a snapshotting EC2 needs (local-cloud/emulators/ebs/state.ts): the
 * snapshots EC2 takes are written straight into it, not through the EBS direct API, so they count
 * against none of its quotas or faults.
 */
export interface SnapshotStore {
  startSnapshot(
    params: { volumeSize: number; parentSnapshotId?: string; description?: string; tags?: Ec2Tag[] },
    maxPending: number,
  ): { snapshot: { id: string } };
  putBlock(
    id: string,
    blockIndex: number,
    params: { dataLength: number; checksum: string; checksumAlgorithm: string },
    body: Buffer,
  ): unknown;
  completeSnapshot(id: string, params: { changedBlocksCount: number }): unknown;
  describeSnapshot(id: string):
    | {
        status: 'pending' | 'completed' | 'error';
        statusMessage: string | undefined;
        volumeSize: number;
        description: string | undefined;
        tags: readonly Ec2Tag[];
        createdAt: number;
      }
    | undefined;
  /** Every snapshot, whoever started it (EC2 or the EBS direct API). */
  snapshotIds(): string[];
}

/** An EC2 API error as the SDK would raise it (`name` is the EC2 error code). */
export class Ec2Error extends Error {
  constructor(
    readonly code: string,
    message: string,
  ) {
    super(message);
    this.name = code;
  }
}

interface VolumeRecord {
  readonly id: string;
  readonly data: Buffer;
  /** Its last snapshot and the contents it holds: the next snapshot is incremental over it. */
  last: { readonly snapshotId: string; readonly content: Buffer } | undefined;
}

interface SnapshotRecord {
  readonly id: string;
  readonly volumeId: string;
  readonly description: string | undefined;
  readonly tags: readonly Ec2Tag[];
  readonly startTime: Date;
  /** Set when writing the snapshot failed (EC2's `error` state). */
  error: string | undefined;
  deleted: boolean;
}

const isZero = (b: Buffer): boolean => {
  for (let i = 0; i < b.length; i++) if (b[i] !== 0) return false;
  return true;
};

/**
 * EC2 in memory: volumes, and snapshots in the EBS emulator. DescribeSnapshots sees every snapshot
 * there, as EC2 does (the target snapshots Ferry starts through the EBS direct API too).
 */
export class LocalEc2 {
  private readonly volumes = new Map<string, VolumeRecord>();
  private readonly snapshots = new Map<string, SnapshotRecord>();
  private readonly writing = new Set<Promise<void>>();

  constructor(private readonly store: SnapshotStore) {}

  /** A new zero-filled volume of `sizeBytes` (a whole number of 512 KiB blocks); its id. */
  createVolume(sizeBytes: number): string {
    if (!Number.isSafeInteger(sizeBytes) || sizeBytes <= 0 || sizeBytes % SNAPSHOT_BLOCK !== 0) {
      throw new Error(`a local volume is a whole number of 512 KiB blocks, not ${sizeBytes} bytes`);
    }
    const id = `vol-${randomBytes(9).toString('hex').slice(0, 17)}`;
    this.volumes.set(id, { id, data: Buffer.alloc(sizeBytes), last: undefined });
    return id;
  }

  /**
   * A volume created from snapshot `snapshotId` holding `content` (the caller read or knows it): like
   * EC2's, its first snapshot is incremental over that snapshot, in its lineage, so ListChangedBlocks
   * between the two lists what was written to the volume since. How a recovered machine's disk looks.
   */
  createVolumeFromSnapshot(snapshotId: string, content: Buffer): string {
    const snap = this.store.describeSnapshot(snapshotId);
    if (snap === undefined)
      throw new Ec2Error('InvalidSnapshot.NotFound', `The snapshot '${snapshotId}' does not exist.`);
    if (snap.status !== 'completed')
      throw new Ec2Error('IncorrectState', `The snapshot '${snapshotId}' is ${snap.status}, not completed.`);
    if (content.length > snap.volumeSize * GiB || content.length % SNAPSHOT_BLOCK !== 0) {
      throw new Error(
        `a volume from ${snapshotId} (${snap.volumeSize} GiB) is a whole number of 512 KiB blocks within it, not ${content.length} bytes`,
      );
    }
    const id = this.createVolume(content.length);
    const vol = this.volumes.get(id)!;
    content.copy(vol.data);
    vol.last = { snapshotId, content: Buffer.from(content) };
    return id;
  }

  /** The volume's bytes, to write to in place (what a running instance does to its disk). */
  volume(id: string): Buffer {
    const v = this.volumes.get(id);
    if (v === undefined) throw new Ec2Error('InvalidVolume.NotFound', `The volume '${id}' does not exist.`);
    return v.data;
  }

  /** Size in GiB as EC2 reports it (VolumeSize): rounded up, at least 1. */
  volumeSizeGiB(id: string): number {
    return Math.max(1, Math.ceil(this.volume(id).length / GiB));
  }

  // ---- the EC2 API ------------------------------------------------------------------------------

  /**
   * CreateSnapshot: the volume's contents as of this call, written in the background into a new
   * emulator snapshot (its parent is the volume's previous snapshot, so only changed blocks are
   * written, zeroed ones included); answers `pending` at once, as EC2 does.
   */
  createSnapshot(input: {
    VolumeId?: string;
    Description?: string;
    TagSpecifications?: { ResourceType?: string; Tags?: Ec2Tag[] }[];
  }) {
    const volumeId = input.VolumeId ?? '';
    const vol = this.volumes.get(volumeId);
    if (vol === undefined) {
      throw new Ec2Error('InvalidVolume.NotFound', `The volume '${volumeId}' does not exist.`);
    }
    const tags = (input.TagSpecifications ?? [])
      .filter((t) => t.ResourceType === undefined || t.ResourceType === 'snapshot')
      .flatMap((t) => t.Tags ?? []);
    const volumeSize = this.volumeSizeGiB(volumeId);
    const content = Buffer.from(vol.data);
    const parent = vol.last;
    const { snapshot } = this.store.startSnapshot(
      {
        volumeSize,
        ...(parent === undefined ? {} : { parentSnapshotId: parent.snapshotId }),
        ...(input.Description === undefined ? {} : { description: input.Description.slice(0, 255) }),
        tags,
      },
      Number.POSITIVE_INFINITY,
    );
    const rec: SnapshotRecord = {
      id: snapshot.id,
      volumeId,
      description: input.Description,
      tags,
      startTime: new Date(),
      error: undefined,
      deleted: false,
    };
    this.snapshots.set(rec.id, rec);
    vol.last = { snapshotId: rec.id, content };
    const write = new Promise<void>((resolve) => setImmediate(resolve))
      .then(() => this.writeBlocks(rec.id, content, parent?.content))
      .catch((err: unknown) => {
        rec.error = err instanceof Error ? err.message : String(err);
      })
      .finally(() => this.writing.delete(write));
    this.writing.add(write);
    return {
      SnapshotId: rec.id,
      VolumeId: volumeId,
      VolumeSize: volumeSize,
      State: 'pending',
      StartTime: rec.startTime.toISOString(),
      Description: input.Description,
      Tags: tags,
    };
  }

  /** DescribeSnapshots: by id (an unknown id is InvalidSnapshot.NotFound) and/or `tag:<key>` filters. */
  describeSnapshots(input: {
    SnapshotIds?: string[];
    OwnerIds?: string[];
    Filters?: { Name?: string; Values?: string[] }[];
  }) {
    const visible = (id: string) =>
      this.store.describeSnapshot(id) !== undefined && !this.snapshots.get(id)?.deleted;
    let ids: string[];
    if (input.SnapshotIds !== undefined && input.SnapshotIds.length > 0) {
      ids = input.SnapshotIds.map((id) => {
        if (!visible(id))
          throw new Ec2Error('InvalidSnapshot.NotFound', `The snapshot '${id}' does not exist.`);
        return id;
      });
    } else {
      ids = this.store.snapshotIds().filter(visible);
    }
    let found = ids.map((id) => this.view(id));
    for (const f of input.Filters ?? []) {
      const key = f.Name?.startsWith('tag:') ? f.Name.slice(4) : undefined;
      if (key === undefined) throw new Ec2Error('InvalidParameterValue', `unsupported filter ${f.Name}`);
      const values = new Set(f.Values ?? []);
      found = found.filter((s) => s.Tags.some((t) => t.Key === key && values.has(t.Value ?? '')));
    }
    return { Snapshots: found };
  }

  /** DeleteSnapshot: hidden from EC2 from now on (the emulator keeps it, as a parent may need it). */
  deleteSnapshot(input: { SnapshotId?: string }) {
    const s = this.snapshots.get(input.SnapshotId ?? '');
    if (s === undefined || s.deleted) {
      throw new Ec2Error('InvalidSnapshot.NotFound', `The snapshot '${input.SnapshotId}' does not exist.`);
    }
    s.deleted = true;
    for (const v of this.volumes.values()) if (v.last?.snapshotId === s.id) v.last = undefined;
    return {};
  }

  /**
   * The module `@aws-sdk/client-ec2` would be, for the calls the functions make (DescribeSnapshots):
   * what `provideRuntimeModule` takes.
   */
  sdkModule(): Record<string, unknown> {
    const ec2 = this;
    class DescribeSnapshotsCommand {
      constructor(readonly input: Parameters<LocalEc2['describeSnapshots']>[0]) {}
    }
    class EC2Client {
      async send(command: unknown) {
        if (command instanceof DescribeSnapshotsCommand) return ec2.describeSnapshots(command.input);
        throw new Ec2Error('UnsupportedOperation', 'the local EC2 client answers DescribeSnapshots only');
      }
      destroy() {}
    }
    return { EC2Client, DescribeSnapshotsCommand };
  }

  /** Resolves when every snapshot being written is written (or failed). */
  async settle(): Promise<void> {
    while (this.writing.size > 0) await Promise.all([...this.writing]);
  }

  /** A snapshot as DescribeSnapshots shows it; EC2's own (source) snapshots know their volume. */
  private view(id: string) {
    const e = this.store.describeSnapshot(id)!;
    const own = this.snapshots.get(id);
    const state = own?.error !== undefined ? 'error' : e.status;
    return {
      SnapshotId: id,
      // Snapshots created through the EBS direct API have no volume: EC2 shows vol-ffffffff.
      VolumeId: own?.volumeId ?? 'vol-ffffffff',
      VolumeSize: e.volumeSize,
      State: state,
      ...(state === 'error' ? { StateMessage: own?.error ?? e.statusMessage ?? 'lost' } : {}),
      StartTime: new Date(own?.startTime.getTime() ?? e.createdAt).toISOString(),
      Description: e.description,
      OwnerId: 'self',
      Tags: [...e.tags],
    };
  }

  private writeBlocks(id: string, content: Buffer, parent: Buffer | undefined): void {
    let written = 0;
    for (let offset = 0; offset < content.length; offset += SNAPSHOT_BLOCK) {
      const block = content.subarray(offset, offset + SNAPSHOT_BLOCK);
      // Over a parent only what changed, a block rewritten to zeros too; a first snapshot has
      // only the blocks that were ever written with data.
      const unchanged =
        parent === undefined ? isZero(block) : block.equals(parent.subarray(offset, offset + SNAPSHOT_BLOCK));
      if (unchanged) continue;
      const body = Buffer.from(block);
      const checksum = createHash('sha256').update(body).digest('base64');
      this.store.putBlock(
        id,
        offset / SNAPSHOT_BLOCK,
        { dataLength: SNAPSHOT_BLOCK, checksum, checksumAlgorithm: 'SHA256' },
        body,
      );
      written++;
    }
    this.store.completeSnapshot(id, { changedBlocksCount: written });
  }
}
