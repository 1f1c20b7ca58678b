// Waiting on work started at once (disks planned, sources opened, targets committed together).

/**
 * Awaits every promise, then returns their values in order or throws the first failure in order: no
 * work is left running behind a failure, and which error is reported does not depend on timing.
 */
export async function settleAll<T>(promises: readonly Promise<T>[]): Promise<T[]> {
  const results = await Promise.allSettled(promises);
  const failed = results.find((r) => r.status === 'rejected');
  if (failed !== undefined) throw failed.reason;
  return results.map((r) => (r as PromiseFulfilledResult<T>).value);
}
