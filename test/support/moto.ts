// Test helper: moto_server (the EC2, EventBridge Scheduler, ... emulator) for the tests, from the local
// cloud's emulator (local-cloud/emulators/moto.ts): 127.0.0.1, a free port, reset between tests, always
// stopped; a missing moto_server fails with pip install 'moto[server]'.
import { type Moto, startMoto as startMotoServer } from '../../local-cloud/emulators/moto.ts';

export {
  findMotoServer,
  MOTO_CREDENTIALS,
  MOTO_INSTALL_HINT,
  MOTO_REGION,
  type Moto,
} from '../../local-cloud/emulators/moto.ts';

/** Starts moto_server for a test file; missing, it names the tests that need it and the install. */
export function startMoto(): Promise<Moto> {
  return startMotoServer({ why: 'the EC2 and Scheduler tests need it' });
}
