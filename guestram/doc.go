// Package guestram reads a local QEMU's guest RAM block by block and hashes every page, so that
// --verify can prove that a paused destination holds exactly the paused source's memory before it runs.
package guestram
