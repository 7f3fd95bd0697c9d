// The chat page's client: one WebSocket to /chat/<room>?name=<name>, written as the
// Cloudflare guide writes a client (new WebSocket, addEventListener, send).
//
// The server sends JSON text frames, one event each:
//   {"type": "message", "name", "text", "at"}   ("replay": true when from history)
//   {"type": "announcement", "text", "at"}      (a system announcement; "replay" too)
//   {"type": "join", "name"}   {"type": "leave", "name"}   {"type": "presence", "names"}
// The client sends each message as plain text.
"use strict";

const params = new URLSearchParams(location.search);
const room = (params.get("room") || "lobby").trim() || "lobby";
const name = (params.get("name") || "").trim() || `guest-${Math.floor(Math.random() * 10000)}`;
const url =
  `${location.protocol === "https:" ? "wss:" : "ws:"}//${location.host}` +
  `/chat/${encodeURIComponent(room)}?name=${encodeURIComponent(name)}`;

const messages = document.getElementById("messages");
const people = document.getElementById("people");
const statusBadge = document.getElementById("status");
const composer = document.getElementById("composer");
const input = document.getElementById("input");
const send = document.getElementById("send");
document.getElementById("room").value = room;
document.getElementById("name").value = name;
document.title = `${room} · wsgate chat`;

// Every (re)connection replays the room's history: messages already shown are skipped.
const shown = new Set();
// Who is here, kept from the presence event and the joins and leaves after it.
let present = new Map();
// Reconnect after 0.5 s, doubling up to 10 s; an open connection resets it.
const FIRST_DELAY_MS = 500;
const MAX_DELAY_MS = 10000;
let delay = FIRST_DELAY_MS;
let websocket = null;

function setStatus(state, text) {
  statusBadge.dataset.state = state;
  statusBadge.textContent = text;
  const open = state === "open";
  input.disabled = !open;
  send.disabled = !open;
}

function addLine(kind, parts, extraClass) {
  const li = document.createElement("li");
  li.className = extraClass ? `${kind} ${extraClass}` : kind;
  for (const part of parts) li.append(part);
  // Follow the conversation unless the reader scrolled up to read older lines.
  const atBottom = messages.scrollHeight - messages.scrollTop - messages.clientHeight < 40;
  messages.append(li);
  if (atBottom) messages.scrollTop = messages.scrollHeight;
  return li;
}

function span(className, text) {
  const el = document.createElement("span");
  el.className = className;
  el.textContent = text; // never innerHTML: names and texts come from other people
  return el;
}

function showPeople() {
  const names = [...present.keys()].sort();
  people.textContent = names.length ? `Here: ${names.join(", ")}` : "";
}

function countIn(who, change) {
  const n = (present.get(who) || 0) + change;
  if (n > 0) present.set(who, n);
  else present.delete(who);
  showPeople();
}

function render(event) {
  switch (event.type) {
    case "message": {
      const key = `${event.at}\u0000${event.name}\u0000${event.text}`;
      if (shown.has(key)) return;
      shown.add(key);
      const time = document.createElement("time");
      const at = new Date(event.at);
      time.dateTime = at.toISOString();
      time.textContent = at.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
      const li = addLine(
        "message",
        [time, span("name", event.name), span("text", event.text)],
        event.replay ? "replay" : "",
      );
      li.dataset.name = event.name;
      return;
    }
    case "announcement": {
      const key = `${event.at}\u0000\u0000${event.text}`;
      if (shown.has(key)) return;
      shown.add(key);
      addLine("announcement", [span("text", event.text)], event.replay ? "replay" : "");
      return;
    }
    case "join":
      countIn(event.name, 1);
      addLine("join", [`${event.name} joined`]);
      return;
    case "leave":
      countIn(event.name, -1);
      addLine("leave", [`${event.name} left`]);
      return;
    case "presence":
      // The names of the others already here; this connection counts itself in.
      present = new Map();
      for (const who of event.names) countIn(who, 1);
      countIn(name, 1);
      addLine("presence", [
        event.names.length ? `In ${room}: ${event.names.join(", ")}` : `${room} is empty`,
      ]);
      return;
    default:
      console.warn("unknown chat event", event);
  }
}

function connect() {
  setStatus("connecting", "connecting");
  websocket = new WebSocket(url);

  websocket.addEventListener("open", () => {
    delay = FIRST_DELAY_MS;
    setStatus("open", `${name} in ${room}`);
    input.focus();
  });

  websocket.addEventListener("message", event => {
    let parsed;
    try {
      parsed = JSON.parse(event.data);
    } catch {
      console.warn("not a chat event", event.data);
      return;
    }
    render(parsed);
  });

  websocket.addEventListener("close", event => {
    setStatus("closed", `disconnected (${event.code}); retrying`);
    present = new Map();
    showPeople();
    setTimeout(connect, delay);
    delay = Math.min(delay * 2, MAX_DELAY_MS);
  });
}

composer.addEventListener("submit", event => {
  event.preventDefault();
  const text = input.value.trim();
  if (!text || !websocket || websocket.readyState !== WebSocket.OPEN) return;
  websocket.send(text);
  input.value = "";
});

connect();
