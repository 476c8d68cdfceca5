// Types of airlock-sdk (index.js).

export declare const ROUTES: ReadonlyArray<readonly [string, string]>;

export declare class AirlockError extends Error {
  status: number;
  code: string;
}

export interface SandboxInfo {
  id: string;
  kind: "browser" | "workspace";
  state: string;
  owner: string;
  image_build_id: string;
  created_at: string;
  updated_at: string;
  ready_at: string | null;
  failure_reason: string | null;
  viewer_url: string;
}

export interface PtySize {
  cols: number;
  rows: number;
}

export interface ProcessInfo {
  pid: number;
  argv: string[];
  state: "running" | "exited";
  exit_code: number | null;
  signal: number | null;
  timed_out: boolean;
  pty: PtySize | null;
  started_at_ms: number;
  ended_at_ms: number | null;
  output_bytes: number;
}

export interface StartOptions {
  env?: Record<string, string>;
  cwd?: string;
  pty?: PtySize;
  stdin?: boolean;
  timeoutS?: number;
}

export interface Exit {
  exitCode: number | null;
  signal: number | null;
  timedOut: boolean;
}

export interface RunResult extends Exit {
  stdout: string;
  stderr: string;
}

export declare class ProcessHandle {
  readonly pid: number;
  readonly opened: Promise<void>;
  readonly exited: Promise<Exit>;
  write(data: string | Uint8Array): Promise<void>;
  resize(cols: number, rows: number): Promise<void>;
  signal(signal: string): Promise<void>;
  eof(): Promise<void>;
  close(): void;
}

export declare class Sandbox {
  readonly id: string;
  info: SandboxInfo | null;
  readonly processes: {
    start(argv: string[], options?: StartOptions): Promise<ProcessInfo>;
    list(): Promise<ProcessInfo[]>;
    get(pid: number): Promise<ProcessInfo>;
    kill(pid: number, signal?: string): Promise<ProcessInfo>;
    attach(
      pid: number,
      options?: { offset?: number; onStdout?: (b: Buffer) => void; onStderr?: (b: Buffer) => void },
    ): ProcessHandle;
    run(
      argv: string[],
      options?: Omit<StartOptions, "stdin"> & {
        stdin?: string | Uint8Array;
        onStdout?: (b: Buffer) => void;
        onStderr?: (b: Buffer) => void;
      },
    ): Promise<RunResult>;
  };
  readonly files: {
    write(path: string, data: string | Uint8Array): Promise<{ path: string; size: number }>;
    read(path: string): Promise<Buffer>;
  };
  refresh(): Promise<SandboxInfo>;
  waitReady(options?: { timeoutMs?: number }): Promise<SandboxInfo>;
  delete(): Promise<SandboxInfo>;
}

export declare class Airlock {
  constructor(options?: { url?: string; token?: string });
  readonly url: string;
  readonly token: string | null;
  readonly sandboxes: {
    create(options?: { kind?: "browser" | "workspace"; wait?: boolean; timeoutMs?: number }): Promise<Sandbox>;
    list(): Promise<SandboxInfo[]>;
    get(id: string): Promise<Sandbox>;
  };
  sandbox(id: string): Sandbox;
}
